"""Which sandbox mirrors a network namespace into its VM.

A VM mirrors a namespace by taking its interfaces' traffic (tcfilter), so a
namespace serves one VM: a second one could only cut the first off. Before
a sandbox mirrors a namespace it looks for it in the saved states of the
sandboxes under its run root, by the namespace's identity (the same
namespace is often reached by two paths: /run/netns/NAME and
/proc/PID/ns/net). Two starts on one namespace may race: the check and the
record of the new mirror happen under one lock, so the second start sees the
first one's record. The lock is the run root's `sandboxes` directory itself,
held with flock(2): there is no lock file to leave behind or to unlink
under another process's feet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pykata.errors import HostError, NetworkError
from pykata.network.tcfilter import NetnsId, netns_identity
from pykata.runtime.state import STATE_FILE, SandboxState, StateFileError, read_state

# The lock is held for a check and a few netlink requests: waiting this long
# means its holder hangs.
LOCK_TIMEOUT = 30.0


def recorded_netns(state: SandboxState) -> NetnsId | None:
    """The namespace `state` records mirroring, None if it mirrors none."""
    if not (state.netns and state.mirrored):
        return None
    if state.netns_ino:
        return NetnsId(state.netns_dev, state.netns_ino)
    # A record written before identities were kept: its path, as it is now.
    try:
        return netns_identity(Path(state.netns))
    except NetworkError:
        return None


def sandbox_states(sandboxes: Path) -> Iterator[SandboxState]:
    """The saved states under `sandboxes` that can be read. One that cannot
    (being written for the first time, or another version's) is skipped:
    its namespace, if any, still has the taps and qdiscs tcfilter refuses."""
    try:
        entries = sorted(sandboxes.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        with contextlib.suppress(StateFileError):
            yield read_state(entry / STATE_FILE, SandboxState)


def holders(netns: NetnsId, states: Iterable[SandboxState]) -> list[SandboxState]:
    """The states among `states` that record mirroring `netns` (live or not:
    the caller asks)."""
    return [state for state in states if recorded_netns(state) == netns]


@contextlib.contextmanager
def exclusive(sandboxes: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the mirror lock of the run root whose `sandboxes` directory this
    is. Blocking, so call it off the event loop; polled, so a holder that
    hangs is named instead of waited for forever."""
    fd = os.open(sandboxes, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostError(
                        f"another pykata process has held the lock on {sandboxes} for "
                        f"{timeout:g} s while mirroring a network namespace",
                        hint="it seems to hang: find it (fuser -v on that directory) "
                             "and stop it") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock
