"""Stale pods: pods whose VM runs guest assets (kernel, and the initrd or root
image its root filesystem came from) older than the
ones a pod started now would get.

After `pykata assets build` or an upgrade, running pods keep the kernel and
agent they booted with: they miss the fix that came with the new ones until
they are restarted. Each sandbox records which assets its VM booted (their
paths, which name the cache key, and each file's inode and modification
time, which tell a file rebuilt in place at a configured path); this module
compares that with what a new pod would boot. A pod recorded before pykata
kept the record is "unknown", never called stale on a guess.

Used by `pykata check` (a warning with the fix), `pykata collect`, and the
monitor's `/sandboxes` (its `stale` field).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from pykata.config import Config
from pykata.errors import PykataError
from pykata.runtime.state import SandboxState


class Staleness(enum.StrEnum):
    CURRENT = "current"  # it runs what a new pod would boot
    STALE = "stale"  # its kernel or guest root is not the current one
    UNKNOWN = "unknown"  # no record of what it booted, or nothing current to compare


@dataclass(frozen=True)
class GuestAssets:
    """A kernel and a guest root (`initrd`: the initrd or the root image), each
    as `path` and `inode:mtime_ns` (empty if unreadable)."""

    kernel: str
    initrd: str
    kernel_stamp: str = ""
    initrd_stamp: str = ""

    @classmethod
    def of(cls, kernel: Path | str, initrd: Path | str) -> GuestAssets:
        return cls(str(kernel), str(initrd), file_stamp(kernel), file_stamp(initrd))


@dataclass(frozen=True)
class Verdict:
    state: Staleness
    detail: str

    @property
    def stale(self) -> bool:
        return self.state is Staleness.STALE


def file_stamp(path: Path | str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_mtime_ns}"


def recorded_assets(state: SandboxState) -> GuestAssets | None:
    if not (state.guest_kernel and state.guest_initrd):
        return None
    return GuestAssets(state.guest_kernel, state.guest_initrd, state.guest_kernel_stamp,
                       state.guest_initrd_stamp)


def current_assets(config: Config) -> GuestAssets:
    """What a pod started now would boot: the configured files, else the
    cache's for the current inputs (AssetsError when none is built)."""
    from pykata.runtime.guest_files import guest_files

    files = guest_files(config.qemu)
    return GuestAssets.of(files.kernel, files.root)


def compare(booted: GuestAssets | None, current: GuestAssets | None) -> Verdict:
    if booted is None:
        return Verdict(Staleness.UNKNOWN, "started by a pykata that did not record its guest "
                                          "assets")
    if current is None:
        return Verdict(Staleness.UNKNOWN, "no current guest assets to compare with")
    old = [what for what, then, now in (
        ("kernel", (booted.kernel, booted.kernel_stamp), (current.kernel, current.kernel_stamp)),
        ("initrd", (booted.initrd, booted.initrd_stamp), (current.initrd, current.initrd_stamp)),
    ) if then != now]
    if not old:
        return Verdict(Staleness.CURRENT, "runs the current kernel and guest root")
    parts = []
    if "kernel" in old:
        parts.append(f"kernel {booted.kernel} (now {current.kernel})")
    if "initrd" in old:
        parts.append(f"guest root {booted.initrd} (now {current.initrd})")
    return Verdict(Staleness.STALE, "boots an older " + " and ".join(parts))


def staleness(state: SandboxState, config: Config | None = None, *,
              current: GuestAssets | None = None) -> Verdict:
    """Whether the sandbox of `state` runs older guest assets than a new pod
    would (the current ones: `current`, else found from `config`)."""
    if current is None and config is not None:
        try:
            current = current_assets(config)
        except PykataError:
            current = None
    return compare(recorded_assets(state), current)
