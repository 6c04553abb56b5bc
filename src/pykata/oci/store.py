"""The command line's containers on disk: `<root>/<id>/state.json`.

`state` and `list` read only these files (podman calls `state` often, so it
must not need the VM): the monitor saves the record on every move, and a
record whose monitor is gone reads as stopped.

A container with a network namespace of its own keeps it pinned at
`<root>/<id>/netns` (a bind mount of the monitor's nsfs file) while its
monitor lives: the path the VM's redirects are recorded under. After a
monitor was killed, `delete` and `pykata cleanup` enter that namespace
through the pin, never through /proc/<pid>/ns/net, which by then may be
another process's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from pykata.errors import AlreadyExistsError, NotFoundError, PykataError
from pykata.runtime.state import ContainerState, StateFileError, process_alive, read_state

# runc's rule for container ids.
_ID = re.compile(r"[\w+.-]+", re.ASCII)
# In a container's directory: its network namespace, pinned by a bind mount.
NETNS_PIN = "netns"


def default_root() -> Path:
    """runc keeps its state in /run/runc; pykata-oci in <pykata's run root>/oci."""
    from pykata.runtime.paths import run_root

    return run_root() / "oci"


def check_id(container_id: str) -> str:
    if not container_id or not _ID.fullmatch(container_id) or container_id in (".", ".."):
        raise PykataError(f"invalid container id {container_id!r}",
                          hint="use letters, digits, '_', '+', '-' and '.'")
    if len(container_id) > 1024:
        raise PykataError("container id is longer than 1024 characters")
    return container_id


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def claim(self, container_id: str) -> Path:
        """Create the container's directory; an id in use is refused."""
        from pykata.runtime.paths import private_dir

        path = self.dir(container_id)
        # Made 0700 when missing; never re-moded when it exists (`--root /run`
        # must not close /run to everyone else), refused when others can write it.
        private_dir(self.root)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExistsError(f"container with id {container_id} exists already",
                                     hint="choose another id, or delete the old one") from None
        except OSError as exc:
            raise PykataError(f"cannot create {path}: {exc.strerror}") from exc
        return path

    def load(self, container_id: str) -> ContainerState:
        path = self.dir(container_id)
        try:
            record = read_state(path / "state.json", ContainerState)
        except StateFileError:
            if not path.is_dir():
                raise NotFoundError(f"container {container_id} does not exist") from None
            raise
        if record.status != "stopped" and not monitor_alive(record):
            record.status = "stopped"
        return record

    def ids(self) -> list[str]:
        try:
            return sorted(e.name for e in self.root.iterdir() if e.is_dir())
        except FileNotFoundError:
            return []

    def remove(self, container_id: str) -> None:
        path = self.dir(container_id)
        release_netns(path)
        shutil.rmtree(path, ignore_errors=True)


def monitor_alive(record: ContainerState) -> bool:
    return process_alive(record.monitor_pid, record.monitor_start)


def pin_netns(state_dir: Path) -> Path:
    """Pin the calling thread's network namespace at `state_dir`/netns (a
    directory only root can write: the container's, just claimed)."""
    from pykata.host import syscalls as sc

    pin = state_dir / NETNS_PIN
    try:
        os.close(os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o400))
    except OSError as exc:
        raise PykataError(f"cannot create {pin}: {exc.strerror}") from exc
    try:
        sc.mount("/proc/thread-self/ns/net", str(pin), "", sc.MS_BIND, "")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(pin)
        raise PykataError(f"cannot pin the container's network namespace at {pin}: "
                          f"{exc.strerror}") from exc
    return pin


def release_netns(state_dir: Path) -> None:
    """Unpin the namespace `pin_netns` kept in `state_dir` (none: nothing to do)."""
    from pykata.host.mounts import unmount

    pin = state_dir / NETNS_PIN
    # Lazily: a process that still has the pin open (a `setns` in flight)
    # keeps the namespace, not the mount.
    unmount(pin, lazy=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin)


def pinned_netns() -> list[Path]:
    """Every nsfs mount named like a pin: pykata-oci's pins, maybe others
    (`ip netns add netns`); the caller tells them apart by the record beside."""
    from pykata.host.mounts import mounts_of_type

    return [point for point in mounts_of_type("nsfs") if point.name == NETNS_PIN]


def abandoned_netns() -> list[Path]:
    """The pins of containers whose monitor is gone (one that exits unpins its
    own: these are a killed monitor's). A pin without a record yet belongs to
    a monitor still creating its container: left alone."""
    found = []
    for pin in pinned_netns():
        try:
            record = read_state(pin.parent / "state.json", ContainerState)
        except StateFileError:
            continue
        if not monitor_alive(record):
            found.append(pin)
    return found
