"""Where a sandbox's files live on the host and in the guest.

    <root>/                            0700 root (default /run/pykata)
    <root>/shims/                      the shims' sockets
    <root>/sandboxes/<key>/            0700: state.json, console.log, qemu.stderr
    <root>/sandboxes/<key>/scratch/    a tmpfs bounded by [runtime] scratch_size:
        share/                         the directories of the share (host-only)
        containers/<id>/               overlay upper and work dirs of `pykata run`
    <root>/sandboxes/<key>/shared/     scratch/share bound read-only: the 9p
                                       export; rootfs and volumes mounted below

A sandbox's key is unique per pod: the shim derives it from containerd's
address, namespace and the pod's id, so the same id in two namespaces or two
containerd instances never shares state. The guest cannot create, rename or
replace anything in the export outside the rootfs and volume mounts (the
export is read-only), so every directory the host mounts on or removes is one
only the host can write.
"""

from __future__ import annotations

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
    """Make `path` (and missing parents) a directory only its owner can enter.

    An existing directory must belong to this user and must not be writable
    by others: pykata's state includes the guest's rootfs and volumes.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise HostError(f"cannot create {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HostError(
            f"{path} is not a directory owned by uid {os.geteuid()}",
            hint="remove it; pykata creates it with mode 0700",
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


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

    def container_volumes(self, container_id: str) -> Path:
        """Where the host paths a container binds in are mounted for the guest."""
        return self.shared_dir / "containers" / container_id / "volumes"

    @staticmethod
    def guest_volumes(container_id: str) -> str:
        return f"{GUEST_SHARED_DIR}/containers/{container_id}/volumes"

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
