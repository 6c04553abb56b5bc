"""virtiofsd: the host process that serves a sandbox's export over virtio-fs.

One per VM, started by `QemuVM.start` before QEMU and ended by
`QemuVM.kill` after it: it never outlives its VM.

- **Its socket.** pykata binds and listens on `<run dir>/virtiofsd.sock` (the
  sandbox's 0700 directory) itself, hands the listening descriptor to
  virtiofsd (`--fd`), connects to it, unlinks the path, and gives QEMU the
  connected end (`-chardev socket,fd=N`). virtiofsd accepts exactly one
  connection and closes its listener; ours is queued before it even runs, so
  nothing else can be first, there is no path to poll for, and no window in
  which another process could connect to it.
- **Its lifetime.** virtiofsd exits when QEMU's end of the socket closes
  (QEMU exited, however it died). It also gets SIGKILL when its owner dies
  (PR_SET_PDEATHSIG, as QEMU); its serving process, forked into a PID
  namespace of its own, gets SIGTERM when that first process dies (virtiofsd
  arms it itself). `stop` waits for it briefly after QEMU, then kills both.
  Its pid is in the sandbox's saved state, so `pykata cleanup` and a shim's
  `delete` end one that a dead owner left (`kill_recorded`).
- **Its confinement** (a hostile guest drives it as root):
  - `-o sandbox=namespace`: new mount, PID and network namespaces, the export
    as its root (pivot_root). The export is a shared mount on the host
    (`runtime.share`): the rootfs and volumes mounted below it after the VM
    started reach virtiofsd's slave copy; nothing flows back;
  - capabilities: its bounding set is CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER,
    CAP_SETUID, CAP_SETGID (it takes each request's uid and gid, so files get
    the guest's owners, as 9p's passthrough model gives them), and for its
    setup only CAP_SYS_ADMIN and CAP_SETPCAP: before it serves, it keeps the
    five (its bounding set too) and drops the rest (`-o modcaps` takes
    CAP_MKNOD, CAP_FSETID and CAP_SETFCAP off its own list: no device nodes,
    writes clear setuid/setgid bits, no file capabilities). No new privileges;
  - seccomp: QEMU's setid filter (`confine.setid_filter`: no setuid/setgid
    modes by chmod, create, mkdir or mknod) under virtiofsd's own allowlist;
  - no POSIX or BSD locks forwarded to the host (`no_posix_lock`,
    `no_flock`): the guest kernel keeps them, so they hold between the
    pod's containers, which share that kernel, and a guest cannot make the
    host hold locks on its files;
  - `--thread-pool-size=0`: requests are served on the queue's own thread (no
    pool of threads a guest can keep busy; virtiofsd's default since QEMU 6.1);
  - `--rlimit-nofile`: every file the guest has looked up holds an O_PATH
    descriptor in virtiofsd until the guest forgets it; MAX_OPEN_FILES bounds
    what one VM can pin on the host (a lookup past it fails with EMFILE in the
    guest), clamped to what this process may give.
- `-o xattr`: extended attributes as 9p's passthrough model has them (user.*;
  security.capability needs CAP_SETFCAP and trusted.* CAP_SYS_ADMIN, both
  gone); `-o announce_submounts`: each mount below the export (a container's
  rootfs, a volume) is a submount in the guest, with its own device number,
  so inode numbers of different host filesystems never collide in the guest
  (what 9p's `multidevs=remap` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.hypervisor.capped_log import CappedLog, read_tail
from pykata.hypervisor.confine import (
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    confining_hook,
)
from pykata.untrusted import guest_text

log = logging.getLogger(__name__)

SOCKET_NAME = "virtiofsd.sock"
LOG_NAME = "virtiofsd.log"
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_SYS_ADMIN = 6, 7, 8, 21
# What virtiofsd may start with. CAP_SYS_ADMIN (its namespaces, pivot_root)
# and CAP_SETPCAP (libcap-ng shrinks the bounding set with it; without it
# virtiofsd exits at start) are for its setup: it drops both, and keeps the
# five others, before it serves the guest.
CAPABILITIES = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_SETGID, CAP_SETUID, CAP_SETPCAP,
                CAP_SYS_ADMIN)
# Descriptors one virtiofsd may hold: files the guest has looked up, plus open ones.
MAX_OPEN_FILES = 65536
CACHE_MODES = ("auto", "always", "none")
_LOG_LIMIT = 64 * 1024
# After QEMU exits, virtiofsd sees its socket close and exits by itself.
_EXIT_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class VirtiofsdConfig:
    """One virtiofsd: its binary, the directory it serves, its cache mode."""

    path: str
    source: Path
    cache: str = "auto"

    def args(self, listen_fd: int, max_files: int) -> list[str]:
        # fuse's -o parser splits on commas; pykata's paths have none (ids
        # are checked), and a run root that has one is refused by `check`.
        return [
            self.path, f"--fd={listen_fd}",
            "-o", f"source={self.source}",
            "-o", "sandbox=namespace",
            "-o", f"cache={self.cache}",
            "-o", "xattr",
            "-o", "announce_submounts",
            "-o", "no_posix_lock",
            "-o", "no_flock",
            "-o", "modcaps=-mknod:-fsetid:-setfcap",
            "-o", "log_level=warn",
            "--thread-pool-size=0",
            f"--rlimit-nofile={max_files}",
        ]

    def check(self) -> None:
        if not os.access(self.path, os.X_OK):
            raise HypervisorError(
                f"virtiofsd not found at {self.path}",
                hint='install qemu-system-common, set [hypervisor.qemu] virtio_fs_daemon, '
                     'or set shared_fs = "virtio-9p"')
        if "," in str(self.source):
            raise HypervisorError(f"virtiofsd cannot serve {self.source}: its path has a comma",
                                  hint="choose a PYKATA_RUN_ROOT without commas")
        if self.cache not in CACHE_MODES:
            raise HypervisorError(f"virtio_fs_cache = {self.cache!r} is not one of "
                                  f"{', '.join(CACHE_MODES)}")


def max_open_files() -> int:
    """MAX_OPEN_FILES, or less when this process's hard limit is lower
    (virtiofsd could not raise its own past it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)


class Virtiofsd:
    """One running virtiofsd, for one VM whose directory is `run_dir`."""

    def __init__(self, config: VirtiofsdConfig, run_dir: Path, *,
                 die_with_parent: bool = True) -> None:
        self.config = config
        self.run_dir = run_dir
        self.die_with_parent = die_with_parent
        self._proc: asyncio.subprocess.Process | None = None
        self._log: CappedLog | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME

    async def start(self) -> socket.socket:
        """Start virtiofsd; return QEMU's end of its vhost-user socket (the
        caller hands it to QEMU and closes it). Nothing is left running on
        failure."""
        self.config.check()
        path = self.run_dir / SOCKET_NAME
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        qemu_end: socket.socket | None = None
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # one a killed start left; the directory is ours
            listener.bind(str(path))
            listener.listen(1)
            # Queued now: virtiofsd's one accept() takes this connection.
            qemu_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            qemu_end.connect(str(path))
            path.unlink()
            await self._spawn(listener.fileno())
        except BaseException as exc:
            if qemu_end is not None:
                qemu_end.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await self.kill()
            if isinstance(exc, OSError):
                raise HypervisorError(f"cannot start virtiofsd: {exc}") from exc
            raise
        finally:
            listener.close()
        return qemu_end

    async def _spawn(self, listen_fd: int) -> None:
        cmd = self.config.args(listen_fd, max_open_files())
        log.debug("starting %s", " ".join(cmd))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, pass_fds=(listen_fd,),
                start_new_session=True,
                preexec_fn=confining_hook(os.getpid(), die_with_parent=self.die_with_parent,
                                          capabilities=CAPABILITIES, name=b"virtiofsd"))
        except OSError as exc:
            raise HypervisorError(
                f"cannot run virtiofsd at {self.config.path}: {exc.strerror}") from exc
        assert self._proc.stderr is not None
        self._log = CappedLog(self.log_path, _LOG_LIMIT)
        self._log.start(self._proc.stderr)

    async def stop(self) -> None:
        """After QEMU exited: wait briefly for virtiofsd to see its socket
        close and exit, then kill what is left."""
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), _EXIT_GRACE_SECONDS)
        await self.kill()

    async def kill(self) -> None:
        """Kill virtiofsd and its serving process at once; safe to repeat."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            kill_tree(proc.pid)
            await proc.wait()
        if self._log is not None:
            await self._log.wait(1.0)
            self._log.stop()
            self._log = None

    def failure_report(self, lines: int = 10) -> str:
        """What virtiofsd said last (it logs the guest's file names: escaped)."""
        text = read_tail(self.log_path, 8192).decode("utf-8", "replace").rstrip()
        tail = "\n".join(text.splitlines()[-lines:])
        return f"virtiofsd said:\n{guest_text(tail)}" if tail else ""


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its children: virtiofsd's serving process is its
    child (PID 1 of virtiofsd's own PID namespace, which SIGKILL from this
    namespace ends)."""
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    return found


def serves(pid: int, source: Path) -> bool:
    """Whether `pid` is a virtiofsd serving `source` (by its command line):
    a recorded pid may have been reused since."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"virtiofsd" in cmdline and f"\0source={source}\0".encode() in cmdline


def kill_recorded(pid: int, source: Path) -> None:
    """End the virtiofsd a dead owner recorded, if it is still that one."""
    if serves(pid, source):
        kill_tree(pid)
