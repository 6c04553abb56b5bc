"""The command line's containers on disk: `<root>/<id>/state.json`.

`state` and `list` read only these files (podman calls `state` often, so it
must not need the VM): the monitor saves the record on every move, and a
record whose monitor is gone reads as stopped.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pykata.errors import AlreadyExistsError, NotFoundError, PykataError
from pykata.runtime.state import ContainerState, StateFileError, process_alive, read_state

# runc's rule for container ids.
_ID = re.compile(r"[\w+.-]+", re.ASCII)


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
        path = self.dir(container_id)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
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
        shutil.rmtree(self.dir(container_id), ignore_errors=True)


def monitor_alive(record: ContainerState) -> bool:
    return process_alive(record.monitor_pid, record.monitor_start)
