"""The guest-hostile suite: the functional tests' fixtures, and what an attacker needs.

Every test here plays a guest (or a container) that tries to reach the host:
root in the guest through a privileged container that shares the guest's
PID namespace (so it reaches the agent's view of the 9p export at
/proc/<agent>/root/run/pykata/shared), static tools built from tools/*.c,
and a hostile agent (hostile_agent/) booted in a real VM in place of pykata's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.assets.busybox_image import ensure_image
from tests.functional.conftest import *  # noqa: F403 - the same VM, CLI and containerd fixtures
from tests.functional.containerd_peer import RUNTIME, CtrResult, PrivateContainerd

TOOLS = Path(__file__).parent / "tools"
NOBODY = 65534

ALL_CAPABILITIES = [f"CAP_{name}" for name in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ")]

# From inside a container that shares the guest's PID namespace: the agent's
# view of the sandbox's 9p export.
GUEST_EXPORT = "/proc/$(pidof python3)/root/run/pykata/shared"


@pytest.fixture(scope="session")
def hostile_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/hostile.c built statically, in a directory every host user can read."""
    out = Path(tempfile.mkdtemp(prefix="pykata-hostile-tools-", dir="/tmp"))
    os.chmod(out, 0o755)
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o", str(out / "hostile"),
                    str(TOOLS / "hostile.c")], check=True)
    yield out  # type: ignore[misc]
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A host directory every host user can enter (a volume a user shares)."""
    path = Path(tempfile.mkdtemp(prefix="pykata-hostile-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` on the host as the unprivileged user nobody."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--", *argv],
                          capture_output=True, text=True, timeout=30)


def privileged_spec(args: list[str], *, annotations: dict[str, str] | None = None,
                    mounts: list[dict[str, Any]] | None = None,
                    readonly: bool = False) -> dict[str, Any]:
    """Root in the guest: every capability, every device, no seccomp, no
    masked paths, and the guest's own PID namespace (it sees the agent)."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "capabilities": {k: ALL_CAPABILITIES for k in ("bounding", "effective",
                                                            "permitted")},
        },
        "root": {"path": str(ensure_image()), "readonly": True},
        "hostname": "hostile",
        "annotations": annotations or {},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["rw"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            *(mounts or []),
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("ipc", "uts", "mount")],
            "resources": {"devices": [{"allow": True, "access": "rwm"}]},
        },
    }


def run_spec(containerd: PrivateContainerd, tmp_path: Path, container_id: str,
             spec: dict[str, Any], *, detach: bool = False,
             timeout: float = 180) -> CtrResult:
    """`ctr run --config SPEC` (no image: the spec's root is the built-in image)."""
    path = tmp_path / f"{container_id}.json"
    path.write_text(json.dumps(spec))
    mode = ("-d",) if detach else ("--rm",)
    return containerd.ctr("run", *mode, "--runtime", RUNTIME, "--config", str(path),
                          container_id, timeout=timeout)


def share_of(container_id: str) -> Path:
    """The host directory of `container_id`'s part of its sandbox's export."""
    from pykata.runtime.paths import run_root

    found = list((run_root() / "sandboxes").glob(f"*/shared/containers/{container_id}"))
    assert len(found) == 1, found
    return found[0]


def wait_for_text(log: Path, marker: str, timeout: float = 90) -> str:
    """A log that a detached container writes into a volume, once it holds `marker`."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        if marker in text:
            return text
        assert time.monotonic() < deadline, f"no {marker!r} in {log}: {text!r}"
        time.sleep(0.2)
