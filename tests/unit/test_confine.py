"""QEMU's confinement, applied for real in a forked child of the test process.

The child runs the same pre-exec hook QEMU gets, then tries what a hostile
guest would ask QEMU's 9p server to do on the host.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest

from pykata.host import syscalls
from pykata.hypervisor import confine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop capabilities")


def _in_confined_child(tmp_path: Path) -> dict[str, int]:
    """Run the probes in a confined child; each reports 0 or its errno."""
    hook = confine.confining_hook(os.getpid())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        results: dict[str, int] = {}

        def probe(name: str, action: object) -> None:
            try:
                action()  # type: ignore[operator]
                results[name] = 0
            except OSError as exc:
                results[name] = exc.errno or -1

        try:
            hook()
            plain = tmp_path / "plain"
            plain.write_text("x")
            probe("chmod 0755", lambda: os.chmod(plain, 0o755))
            probe("chmod 4755", lambda: os.chmod(plain, 0o4755))
            probe("chmod 2755", lambda: os.chmod(plain, 0o2755))
            probe("fchmod 4755", lambda: os.fchmod(os.open(plain, os.O_RDONLY), 0o4755))
            probe("open O_CREAT 4755", lambda: os.open(tmp_path / "new", os.O_CREAT | os.O_WRONLY,
                                                       0o4755))
            probe("mkdir 2755", lambda: os.mkdir(tmp_path / "dir", 0o2755))
            probe("mknod block", lambda: os.mknod(tmp_path / "disk", stat.S_IFBLK | 0o666,
                                                  os.makedev(8, 0)))
            probe("file capability", lambda: os.setxattr(
                plain, "security.capability", b"\x01\x00\x00\x02" + b"\xff" * 16))
            probe("openat2", lambda: os.close(syscalls.openat2(
                syscalls.AT_FDCWD, str(plain), os.O_RDONLY, 0)))
            status = Path("/proc/self/status").read_text()
            bounding = next(line for line in status.splitlines() if line.startswith("CapBnd"))
            results["bounding"] = int(bounding.split()[1], 16)
            os.write(write_end, repr(results).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the confined child reported nothing"
    import ast

    return ast.literal_eval(data.decode())  # type: ignore[no-any-return]


def test_confined_qemu_cannot_make_setid_files_devices_or_capabilities(tmp_path: Path) -> None:
    """Setuid/setgid modes fail with EPERM, so do device nodes and file
    capabilities; an ordinary chmod still works; only four capabilities stay."""
    results = _in_confined_child(tmp_path)
    assert results["chmod 0755"] == 0
    for name in ("chmod 4755", "chmod 2755", "fchmod 4755", "open O_CREAT 4755",
                 "mkdir 2755", "mknod block", "file capability"):
        assert results[name] == errno.EPERM, (name, results)
    assert results["openat2"] == errno.ENOSYS
    assert results["bounding"] == sum(1 << c for c in confine.KEPT_CAPABILITIES)
    assert not (tmp_path / "new").exists() and not (tmp_path / "disk").exists()
    assert not stat.S_IMODE((tmp_path / "plain").stat().st_mode) & confine.SETID_BITS


def test_a_qemu_whose_owner_already_died_never_runs() -> None:
    """The owner died between fork and the death signal taking effect (the
    child's parent is not the pid the hook was made for): the child exits at
    once instead of living on as an orphaned VM."""
    hook = confine.confining_hook(parent_pid=1)  # no test runs as PID 1's child
    pid = os.fork()
    if pid == 0:
        try:
            hook()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_filter_program_jumps_resolve() -> None:
    """Every jump of the seccomp program lands inside it."""
    rows = confine.setid_filter()
    for i, (code, jt, jf, k) in enumerate(rows):
        if code == 0x05:
            assert i + 1 + k < len(rows)
        elif code & 0x07 == 0x05:
            assert i + 1 + max(jt, jf) < len(rows)
    assert rows[-1][3] == confine.RET_ERRNO | confine.ENOSYS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
