"""Saved state: what a sandbox or a container leaves on disk for other processes.

One typed, versioned record per sandbox (in its state directory) and per OCI
container (under the command line's --root). Every front end and `pykata
cleanup` read them through this module; nothing parses state.json by hand.

Records are written atomically (a temporary file, fsync, rename), so a reader
sees the old record or the new one, never half of one. A record of another
version, or with a field of the wrong type, is refused with an error that
names the file: state is only ever read back by the pykata that wrote it,
and guessing at a record could make cleanup remove the wrong thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pykata.errors import PykataError

# 2: a sandbox records its pod's status and its containers', and its control socket.
STATE_VERSION = 2
STATE_FILE = "state.json"


class StateFileError(PykataError):
    """A state record is missing, unreadable or not one this pykata wrote."""


@dataclass
class SandboxState:
    """A sandbox as its owner (the process holding its VM) records it."""

    id: str
    key: str
    front_end: str  # "run", "shim" or "oci": who started it
    owner_pid: int
    owner_start: int  # the owner's start time in clock ticks: tells pid reuse
    console_log: str
    created: float
    qemu_pid: int = 0
    # The VM's virtiofsd (0 on 9p): it dies with QEMU and with the owner;
    # cleanup ends one still serving the sandbox's export, by this record.
    virtiofsd_pid: int = 0
    # The pod's control socket (runtime.control), served by the owner.
    control_socket: str = ""
    # The pod network namespace whose interfaces (name: index) carry pykata's
    # tc redirects: what `pykata cleanup` removes once the owner is gone.
    # Recorded once they exist, never before: a start that failed made none.
    netns: str = ""
    mirrored: dict[str, int] = field(default_factory=dict)
    # That namespace's identity (its nsfs device and inode; 0 in records of
    # older pykatas): another sandbox is refused the same namespace under any
    # path, and cleanup never works in a namespace the path leads to since.
    netns_dev: int = 0
    netns_ino: int = 0
    # "cold" (booted), "template" (restored from a VM template) or "cache"
    # (kept warm by the VM cache); "" while starting.
    boot: str = ""
    # QEMU's -name is pykata-<vm_name> (a cached VM keeps its warm name).
    vm_name: str = ""
    # The pod's status (creating, running, stopped) and its containers':
    # container id -> {exec id ("" for the init): status}.
    status: str = ""
    containers: dict[str, dict[str, str]] = field(default_factory=dict)
    # The host cgroup directories pykata made for the pod (parents first):
    # what teardown, or `pykata cleanup` after a dead owner, removes.
    cgroups: list[str] = field(default_factory=list)
    # The guest assets its VM booted (paths, and `inode:mtime_ns` stamps):
    # what `runtime.staleness` compares with the current ones. Empty in
    # records of older pykatas (their pods are "unknown", not stale).
    guest_kernel: str = ""
    guest_initrd: str = ""
    guest_kernel_stamp: str = ""
    guest_initrd_stamp: str = ""
    version: int = STATE_VERSION


@dataclass
class ContainerState:
    """A container of the OCI command line, in `<root>/<id>/state.json`."""

    id: str
    bundle: str
    status: str  # a lifecycle.Status value
    sandbox_key: str
    run_root: str  # pykata's state root the sandbox lives under
    created: str  # RFC 3339, as runc's `state` prints it
    owner: str
    rootfs: str
    annotations: dict[str, str] = field(default_factory=dict)
    # The host process that stands for the container's init (the pid
    # contract): the monitor, which also holds the VM.
    monitor_pid: int = 0
    monitor_start: int = 0
    control_socket: str = ""
    exit_status: int = -1
    exited_at: str = ""
    version: int = STATE_VERSION


T = TypeVar("T", SandboxState, ContainerState)


def write_state(path: Path, record: SandboxState | ContainerState) -> None:
    """Replace the record at `path` atomically (mode 0600)."""
    data = json.dumps(dataclasses.asdict(record), sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_state(path: Path, kind: type[T]) -> T:
    """The record at `path`, checked field by field against `kind`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"no state at {path}") from None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateFileError(f"{path} is not JSON: {exc}") from exc
    return from_dict(data, kind, where=str(path))


def from_dict(data: Any, kind: type[T], *, where: str) -> T:
    if not isinstance(data, dict):
        raise StateFileError(f"{where}: a state record is an object")
    version = data.get("version")
    if version != STATE_VERSION:
        raise StateFileError(
            f"{where}: state version {version!r}, this pykata reads version {STATE_VERSION}",
            hint="it was written by another pykata version; stop that pykata's containers "
                 "with it, or remove the directory after `pykata cleanup`")
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise StateFileError(f"{where}: field {f.name!r} is missing")
            continue
        value = data[f.name]
        if not _is(value, hints[f.name]):
            raise StateFileError(f"{where}: field {f.name!r} has the wrong type")
        values[f.name] = value
    return kind(**values)


def _is(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item_type,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is(v, item_type) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _is(k, key_type) and _is(v, value_type) for k, v in value.items())
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def rfc3339(t: float) -> str:
    """A wall-clock time as runc's state and logs print it (nanoseconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f"{t % 1:.9f}"[1:] + "Z"


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> int:
    """When `pid` started (clock ticks since boot), 0 if it does not exist.

    With the pid it names one process for good: a pid reused after the
    owner died has another start time."""
    try:
        return int(_stat(pid)[19])
    except (IndexError, ValueError):
        return 0


def process_alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs (a zombie
    counts as gone: it runs nothing)."""
    if pid <= 0 or start <= 0:
        return False
    fields = _stat(pid)  # one read: podman asks `state` often
    try:
        return int(fields[19]) == start and fields[0] not in (b"Z", b"X")
    except (IndexError, ValueError):
        return False
