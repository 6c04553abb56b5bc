"""Mounting what the host shares with the guest (the Storage messages)."""

from __future__ import annotations

import logging
from pathlib import Path

from pykata.agent import spans
from pykata.agent.reaper import Reaper
from pykata.agent.spawn import run
from pykata.protocols import agent_pb2
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

BUSYBOX = "/bin/busybox"
# The drivers this agent can mount, as Storage.driver names them.
DRIVERS = {"9p": "9p", "virtio-fs": "virtiofs", "local": "tmpfs"}


def _check_mount_point(path: str) -> Path:
    target = Path(path)
    if not target.is_absolute() or ".." in target.parts:
        raise StatusError(Code.INVALID_ARGUMENT, f"storage mount point {path!r} is not absolute")
    return target


async def mount_storage(reaper: Reaper, storage: agent_pb2.Storage) -> Path:
    fstype = DRIVERS.get(storage.driver)
    if fstype is None:
        raise StatusError(
            Code.INVALID_ARGUMENT,
            f"storage driver {storage.driver!r} is not supported (supported: {sorted(DRIVERS)})",
        )
    target = _check_mount_point(storage.mount_point)
    target.mkdir(parents=True, exist_ok=True)
    argv = [BUSYBOX, "mount", "-t", storage.fstype or fstype]
    if storage.options:
        argv += ["-o", ",".join(storage.options)]
    argv += [storage.source or "none", str(target)]
    with spans.span("mount", fstype=storage.fstype or fstype, mount_point=str(target)):
        result = await run(reaper, argv)
    if result.code != 0:
        raise StatusError(Code.INTERNAL, f"mounting {storage.source} at {target}: "
                                         f"{result.error_text()}")
    log.debug("mounted %s (%s) at %s", storage.source, fstype, target)
    return target


async def unmount(reaper: Reaper, target: Path) -> None:
    result = await run(reaper, [BUSYBOX, "umount", "-l", str(target)])
    if result.code != 0:
        log.warning("unmounting %s: %s", target, result.error_text())

