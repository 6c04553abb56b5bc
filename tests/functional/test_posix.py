"""POSIX file semantics on runc, pykata over 9p and pykata over virtio-fs.

The same static program (tools/posix.c) runs each operation in a busybox
container's root filesystem under runc on the host's filesystem, and in a
pykata VM over each shared filesystem; the lock operations run between two
containers of one pod sharing a host directory. runc is the reference: every
operation passes there. `EXPECTED` is what each pykata filesystem gives, as
the README's POSIX table says: a change either way fails a test, so the
table stays true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.assets.busybox_image import ensure_image
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from tests.functional import conftest as fconf
from tests.functional.conftest import run_in_sandbox

TOOLS = Path(__file__).parent / "tools"
IN_ROOTFS = ("unlinked", "mmap", "rename", "hardlink", "xattr", "fsync")
BETWEEN_CONTAINERS = ("flock", "fcntl")
# What fails on each pykata filesystem (everything else passes, as on runc).
EXPECTED_FAILURES = {
    "virtio-9p": {"unlinked", "mmap"},
    "virtio-fs": set(),
}
HOLD_SECONDS = 8


@pytest.fixture(scope="module")
def posix_tool() -> Iterator[Path]:
    """tools/posix.c built statically, in a directory every user can read."""
    out = Path(tempfile.mkdtemp(prefix="pykata-posix-", dir="/tmp"))
    os.chmod(out, 0o755)
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o", str(out / "posix"),
                    str(TOOLS / "posix.c")], check=True)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pykata-posix-vol-", dir="/tmp"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bind(source: Path, destination: str, mode: str) -> dict[str, object]:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": ["rbind", mode]}


# --- runc, the reference --------------------------------------------------------

def _runc_bundle(where: Path, args: list[str], tool: Path, volume: Path) -> Path:
    """A runc bundle: a copy of the busybox image, the tool and `volume` bound in."""
    bundle = where / "bundle"
    shutil.copytree(ensure_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=args, terminal=False)
    spec["root"]["readonly"] = False
    spec["mounts"] += [_bind(tool, "/tool", "ro"), _bind(volume, "/vol", "rw")]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _runc(tmp: Path, name: str, args: list[str], tool: Path, volume: Path
          ) -> subprocess.Popen[str]:
    bundle = _runc_bundle(tmp / name, args, tool, volume)
    return subprocess.Popen(["runc", "--root", str(tmp / "runc-state"), "run", "-b",
                             str(bundle), f"pykata-posix-{os.getpid()}-{name}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=120)
    return out


# --- pykata ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["virtio-9p", "virtio-fs"])
async def pykata_pod(request: pytest.FixtureRequest, pykata_config: config.Config
                     ) -> AsyncIterator[Sandbox]:
    """One VM per shared filesystem, kept for the module's tests."""
    cfg = dataclasses.replace(pykata_config, qemu=dataclasses.replace(
        pykata_config.qemu, shared_fs=request.param))
    sandbox = Sandbox(f"posix-{request.param}", cfg, SandboxOptions(vcpus=1, memory_mib=512))
    fconf._shared_ids.add(sandbox.id)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.stop()
        fconf._shared_ids.discard(sandbox.id)


def _kind(sandbox: Sandbox) -> str:
    return sandbox.config.qemu.shared_fs


async def _in_pod(sandbox: Sandbox, name: str, args: list[str], tool: Path,
                  volume: Path) -> str:
    run = await run_in_sandbox(sandbox, args, container_id=name,
                               mounts=[_bind(tool, "/tool", "ro"), _bind(volume, "/vol", "rw")])
    return (run.stdout + run.stderr).decode()


def _in_rootfs(operation: str) -> list[str]:
    return ["sh", "-c", f"mkdir -p /posix && exec /tool/posix {operation} /posix"]


def _holder_and_trier(lock: str) -> tuple[list[str], list[str]]:
    return ([ "/tool/posix", f"{lock}-hold", "/vol/lockfile", str(HOLD_SECONDS)],
            ["/tool/posix", f"{lock}-try", "/vol/lockfile"])


@pytest.mark.parametrize("operation", IN_ROOTFS)
def test_runc_passes_in_its_rootfs(operation: str, posix_tool: Path, shared_dir: Path,
                                   tmp_path: Path) -> None:
    """The reference: each operation in a runc container's root filesystem."""
    out = _finish(_runc(tmp_path, operation, _in_rootfs(operation), posix_tool, shared_dir))
    assert out.strip() == "ok", out


@pytest.mark.parametrize("lock", BETWEEN_CONTAINERS)
def test_runc_locks_hold_between_two_containers(lock: str, posix_tool: Path,
                                                shared_dir: Path, tmp_path: Path) -> None:
    """The reference: a lock one runc container holds on a shared file keeps
    another container out."""
    hold, attempt = _holder_and_trier(lock)
    holder = _runc(tmp_path, "holder", hold, posix_tool, shared_dir)
    trier = _runc(tmp_path, "trier", attempt, posix_tool, shared_dir)
    tried, held = _finish(trier), _finish(holder)
    assert held.strip() == "ok" and tried.strip() == "ok", (held, tried)


@pytest.mark.parametrize("operation", IN_ROOTFS)
async def test_pykata_in_its_rootfs(operation: str, pykata_pod: Sandbox, posix_tool: Path,
                                    shared_dir: Path) -> None:
    """Each operation in a pykata container's root filesystem (the shared
    filesystem's), as EXPECTED_FAILURES says for this filesystem."""
    out = await _in_pod(pykata_pod, f"posix-{operation}", _in_rootfs(operation), posix_tool,
                        shared_dir)
    if operation in EXPECTED_FAILURES[_kind(pykata_pod)]:
        assert out.startswith("fail:") and "create" not in out, out
    else:
        assert out.strip() == "ok", out


@pytest.mark.parametrize("lock", BETWEEN_CONTAINERS)
async def test_pykata_locks_between_two_containers_of_a_pod(
        lock: str, pykata_pod: Sandbox, posix_tool: Path, shared_dir: Path) -> None:
    """A lock one container of the pod holds on a file of a shared host
    directory, tried by another container of the same pod."""
    hold, attempt = _holder_and_trier(lock)
    held, tried = await asyncio.gather(
        _in_pod(pykata_pod, f"{lock}-holder", hold, posix_tool, shared_dir),
        _in_pod(pykata_pod, f"{lock}-trier", attempt, posix_tool, shared_dir))
    assert held.strip() == "ok", held
    if lock in EXPECTED_FAILURES[_kind(pykata_pod)]:
        # The lock was taken, and did not keep the other container out.
        assert "succeeded while another container holds the lock" in tried, tried
    else:
        assert tried.strip() == "ok", tried
