"""`delete`: clean up after a shim that can no longer be reached.

containerd runs this when the shim died (its VM died with it: QEMU is killed
when its owner dies) or cannot be reached after a restart. It unmounts the
task's rootfs, ends a VM still running, removes the sandbox's host state, and
answers with a DeleteResponse on stdout, exit status 137 (killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from pykata.errors import PykataError
from pykata.host.mounts import unmount_all
from pykata.protocols import shim_pb2
from pykata.runtime.lifecycle import VM_DIED_STATUS
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import cleanup_host_state, qemu_running, read_sandbox_state
from pykata.shim.events import now
from pykata.shim.flags import ShimFlags
from pykata.shim.start import (
    _answers,
    group_of,
    pod_lock,
    release_pod_files,
    sandbox_key,
    socket_path,
)


def _kill_vm(paths: SandboxPaths) -> None:
    """SIGKILL the sandbox's QEMU if it still runs (checked by its command line)."""
    try:
        state = read_sandbox_state(paths)
    except PykataError:
        return
    if qemu_running(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.qemu_pid, signal.SIGKILL)


def delete(flags: ShimFlags) -> int:
    bundle = flags.bundle_dir()
    warnings: list[str] = []
    try:
        unmount_all(Path(bundle) / "rootfs")
    except PykataError as exc:
        warnings.append(str(exc))
    group = group_of(bundle, flags.id)
    path = socket_path(flags, group)
    with pod_lock(path):
        if not _answers(path):
            # The pod's shim is gone, so is its VM: clean up the whole sandbox.
            try:
                paths = SandboxPaths.for_key(sandbox_key(flags, group))
                _kill_vm(paths)
                cleanup_host_state(paths)
            except PykataError as exc:
                warnings.append(str(exc))
            release_pod_files(path)
    for warning in warnings:
        print(f"pykata shim delete: {warning}", file=sys.stderr)
    response = shim_pb2.DeleteResponse(pid=0, exit_status=VM_DIED_STATUS, exited_at=now())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.buffer.flush()
    return 0
