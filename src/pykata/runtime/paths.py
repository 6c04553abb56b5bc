"""Where a sandbox's files live on the host and in the guest.

    <root>/                            0700 root (default /run/pykata)
    <root>/shims/                      the shims' sockets
    <root>/sandboxes/<key>/            0700: state.json, console.log, qemu.stderr,
                                       virtiofsd.log (virtio-fs)
    <root>/sandboxes/<key>/scratch/    a tmpfs bounded by [runtime] scratch_size:
        share/                         the directories of the share (host-only)
        containers/<id>/               overlay upper and work dirs of `pykata run`
    <root>/sandboxes/<key>/shared/     scratch/share bound read-only: the
                                       export; rootfs and volumes mounted below

A sandbox's key is unique per pod: the shim derives it from containerd's
address, namespace and the pod's id, so the same id in two namespaces or two
containerd instances never shares state. The guest cannot create, rename or
replace anything in the export outside the rootfs and volume mounts (the
export is read-only), so every directory the host mounts on or removes is one
only the host can write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pykata.errors import HostError, PykataError

GUEST_SHARED_DIR = "/run/pykata/shared"
DEFAULT_RUN_ROOT = "/run/pykata"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def run_root() -> Path:
    """The root of pykata's runtime state (tests may move it with PYKATA_RUN_ROOT).

    An empty PYKATA_RUN_ROOT is unset; a relative one is refused: pykata
    would make the current directory private (0700) and fill it."""
    value = os.environ.get("PYKATA_RUN_ROOT") or str(DEFAULT_RUN_ROOT)
    if not os.path.isabs(value):
        raise PykataError(f"PYKATA_RUN_ROOT={value!r} is not an absolute path",
                          hint=f"give an absolute path, or unset it for {DEFAULT_RUN_ROOT}")
    return Path(value)


def check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise PykataError(
            f"invalid {kind} {value!r}",
            hint="use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


def private_dir(path: Path) -> Path:
    """`path` as a directory no other user can change, made private (0700,
    as is every missing parent) when it does not exist.

    An existing directory is never changed: it must belong to this user and
    be writable by no one else (pykata mounts the guest's rootfs and volumes
    below it), else HostError names it and the fix. A directory pykata did
    not make may be another program's (/run, a home directory): changing its
    mode would break that program. What is private in pykata's state is so
    because pykata made it so (a sandbox's directory is 0700), not because
    a directory above it was tightened later.
    """
    try:
        _make_missing(path)
        st = os.lstat(path)
    except OSError as exc:
        raise HostError(f"cannot create {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HostError(
            f"{path} is not a directory owned by uid {os.geteuid()}",
            hint="remove it; pykata creates it with mode 0700",
        )
    if st.st_mode & 0o022:
        raise HostError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): pykata "
            "keeps its state only where no one else can change it, and does not change "
            "the mode of a directory it did not create",
            hint=f"if {path} is pykata's, run `chmod go-w {path}`; otherwise choose another path",
        )
    return path


def _make_missing(path: Path) -> None:
    """Create `path` and its missing parents, each 0700, leaving every
    directory that exists as it is."""
    missing: list[Path] = []
    at = path
    while not os.path.lexists(at) and at != at.parent:
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        # One made meanwhile by another process is checked as any existing one.
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def others_can_replace(directory: Path) -> str:
    """Why a user other than this one (or root) could replace or add entries
    of `directory`, through it or through any directory or link on the way
    to it; "" when none can.

    A socket or file pykata makes there is then pykata's for as long as it
    stays: nobody else can swap it between a check and its use. A
    sticky-bit directory anyone can write (/tmp) is fine on the way, when
    the entry in it is this user's or root's, but not as `directory` itself.
    """
    trusted = {0, os.geteuid()}
    try:
        for parent, name, entry in _walk(directory):
            if entry.st_uid not in trusted:
                return f"{parent / name} belongs to uid {entry.st_uid}"
            problem = _open_for_writing(parent, trusted, sticky_ok=True)
            if problem:
                return problem
        return _open_for_writing(Path(os.path.realpath(directory)), trusted, sticky_ok=False)
    except OSError as exc:
        return f"cannot check {directory}: {exc.strerror}"


def _open_for_writing(directory: Path, trusted: set[int], *, sticky_ok: bool) -> str:
    st = os.lstat(directory)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in trusted:
        return f"{directory} belongs to uid {st.st_uid}"
    if mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX):
        return f"{directory} is writable by other users (mode {mode:04o})"
    return ""


def _walk(path: Path) -> list[tuple[Path, str, os.stat_result]]:
    """Each entry met on the way to `path` (links followed, as the kernel
    would): the real directory holding it, its name and its lstat."""
    met: list[tuple[Path, str, os.stat_result]] = []
    todo = list(reversed(path.parts[1:]))
    at = Path("/")
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            at = at.parent
            continue
        st = os.lstat(at / name)
        met.append((at, name, st))
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = Path(os.readlink(at / name))
            if target.is_absolute():
                at = Path("/")
            todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        at = at / name
    return met


@dataclass(frozen=True)
class SandboxPaths:
    key: str
    root: Path

    @classmethod
    def for_key(cls, key: str) -> SandboxPaths:
        return cls(check_id("sandbox key", key), run_root())

    @property
    def sandboxes(self) -> Path:
        return self.root / "sandboxes"

    @property
    def run_dir(self) -> Path:
        """State file, console log, QEMU's stderr; the scratch and export mounts."""
        return self.sandboxes / self.key

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def scratch_dir(self) -> Path:
        """The sandbox's bounded tmpfs: everything pykata stores for it."""
        return self.run_dir / "scratch"

    @property
    def share_source(self) -> Path:
        """The export's directories, writable by the host only."""
        return self.scratch_dir / "share"

    @property
    def shared_dir(self) -> Path:
        """Exported to the guest as its /run/pykata/shared (read-only at its top)."""
        return self.run_dir / "shared"

    @staticmethod
    def container_share(container_id: str) -> PurePosixPath:
        """The container's directory, relative to the export."""
        return PurePosixPath("containers", container_id)

    def container_rootfs(self, container_id: str) -> Path:
        return self.shared_dir / "containers" / container_id / "rootfs"

    @staticmethod
    def guest_rootfs(container_id: str) -> str:
        return f"{GUEST_SHARED_DIR}/containers/{container_id}/rootfs"

    def scratch(self, container_id: str) -> Path:
        """Host-only space of one container (overlay upper/work dirs)."""
        return self.scratch_dir / "containers" / container_id


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(old: Path, new: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `new`
    (an empty directory would be replaced silently otherwise)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new),
                      _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(new))  # EEXIST: FileExistsError


def shim_dir(root: Path | None = None) -> Path:
    return (root or run_root()) / "shims"
