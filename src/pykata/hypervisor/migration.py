"""Saving a VM's device state to a file and restoring it, over QMP.

Only device state crosses: the guest's RAM is a file both VMs map
(`x-ignore-shared`), so a save takes milliseconds and a restore maps the
template's pages instead of copying them. QEMU gets the state file as an
open descriptor (getfd over the QMP socket): its `-sandbox spawn=deny` rules
out `exec:` and QEMU 7.2 has no `file:` transport.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pykata.errors import HypervisorError
from pykata.hypervisor.qmp import QmpConnection

_FD_NAME = "pykata-state"
_POLL_SECONDS = 0.005
_IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


async def save_state(qmp: QmpConnection, state_file: Path, timeout: float) -> None:
    """Pause the VM and write its device state to `state_file` (made 0600)."""
    await qmp.execute("stop")
    await qmp.execute("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await _hand_fd(qmp, fd)
        await qmp.execute("migrate", uri=f"fd:{_FD_NAME}")
        await _until(qmp, "query-migrate", "migration", timeout, done={"completed"})
    finally:
        os.close(fd)


async def restore_state(qmp: QmpConnection, state_file: Path, timeout: float) -> None:
    """Load `state_file` into a VM started with `-incoming defer` and resume it."""
    await qmp.execute("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
    try:
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"cannot open the saved VM state {state_file}: "
                              f"{exc.strerror}") from exc
    try:
        await _hand_fd(qmp, fd)
        await qmp.execute("migrate-incoming", uri=f"fd:{_FD_NAME}")
        # A template is saved paused, and a VM restored from it stays so.
        await _until(qmp, "query-status", "restore", timeout, done={"running", "paused"})
        await qmp.execute("cont")
    finally:
        os.close(fd)


async def _hand_fd(qmp: QmpConnection, fd: int) -> None:
    qmp.send_fd(fd)
    await qmp.execute("getfd", fdname=_FD_NAME)


async def _until(qmp: QmpConnection, query: str, what: str, timeout: float,
                 done: set[str]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reply: Any = await qmp.execute(query)
        status = reply.get("status", "") if isinstance(reply, dict) else ""
        if status in done:
            return
        if status in ("failed", "cancelled", "internal-error", "io-error"):
            detail = reply.get("error-desc", "") if isinstance(reply, dict) else ""
            raise HypervisorError(f"VM {what} failed: {status} {detail}".rstrip())
        if what == "restore" and status == "inmigrate":
            # The incoming side reports its failure through query-migrate.
            migrate: Any = await qmp.execute("query-migrate")
            if isinstance(migrate, dict) and migrate.get("status") == "failed":
                raise HypervisorError(
                    f"VM restore failed: {migrate.get('error-desc', 'no reason given')}")
        if loop.time() > deadline:
            raise HypervisorError(f"VM {what} did not finish within {timeout:g} s "
                                  f"(QEMU says {status or 'nothing'})")
        await asyncio.sleep(_POLL_SECONDS)
