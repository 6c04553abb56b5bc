"""OCI bundles: reading and checking config.json, and the spec `pykata run` makes.

Checks name the offending field (`process.args`), because "invalid spec" alone
sends the user hunting through a few hundred lines of JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pykata.errors import SpecError
from pykata.protocols.oci_spec import InvalidSpecError, spec_from_json
from pykata.runtime.spec_versions import (
    absolute_mount_destinations,
    check_bundle_fields,
    check_version,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The capabilities a container gets by default: the set container engines grant.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


def load_bundle(bundle: Path) -> tuple[dict[str, Any], Path]:
    """The bundle's config.json, checked, and the rootfs path it names."""
    config = bundle / "config.json"
    try:
        spec = json.loads(config.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"{config} does not exist", hint="an OCI bundle needs a config.json"
        ) from None
    except OSError as exc:
        raise SpecError(f"cannot read {config}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SpecError(f"{config} is not valid JSON: {exc}") from exc
    check_spec(spec, str(config))
    absolute_mount_destinations(spec)
    root = Path(spec["root"]["path"])
    return spec, root if root.is_absolute() else bundle / root


def check_spec(spec: Any, where: str) -> None:
    """The checks runc makes before anything starts, with the field named, and
    those of the newer runtime-spec fields (pykata.runtime.spec_versions)."""
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: the top level must be a JSON object")
    check_version(spec.get("ociVersion"), where)
    process = spec.get("process")
    if not isinstance(process, dict):
        raise SpecError(f"{where}: process must be an object")
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}: process.args must be a non-empty list of strings")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise SpecError(f"{where}: process.cwd must be an absolute path")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise SpecError(f"{where}: root.path must be a non-empty string")
    try:
        spec_from_json(spec)
    except InvalidSpecError as exc:
        raise SpecError(f"{where}: {exc}") from exc
    check_bundle_fields(spec, where)


def default_spec(
    args: list[str],
    *,
    terminal: bool = False,
    env: list[str] | None = None,
    cwd: str = "/",
    hostname: str = "pykata",
) -> dict[str, Any]:
    """A spec like `runc spec` writes, for `args`, with the rootfs at "rootfs"."""
    caps = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"PATH={DEFAULT_PATH}", "HOME=/root",
                    *(["TERM=xterm"] if terminal else []), *(env or [])],
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }


def network_namespace(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The spec's network namespace entry, None when it has none."""
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for entry in namespaces if isinstance(namespaces, list) else []:
        if isinstance(entry, dict) and entry.get("type") == "network":
            return entry
    return None


def network_namespace_path(spec: dict[str, Any]) -> str:
    """The path of the network namespace the spec joins ("" when it names
    none): CRI's pod namespace, podman's, `ctr run --with-ns network:PATH`."""
    path = (network_namespace(spec) or {}).get("path")
    return path if isinstance(path, str) else ""


def spec_hostname(spec: dict[str, Any], default: str) -> str:
    """The hostname the spec gives (CRI's pod hostname, docker's container
    id), for the VM: the guest's containers share its UTS namespace."""
    hostname = spec.get("hostname")
    return hostname if isinstance(hostname, str) and hostname else default
