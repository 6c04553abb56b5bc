"""Which shared filesystem a sandbox gets, and why: `[hypervisor.qemu] shared_fs`.

"virtio-9p" is QEMU's own 9p server; "virtio-fs" is a virtiofsd process per
sandbox (see `hypervisor.virtiofsd`); "auto" picks virtio-fs where it can be
honoured and 9p otherwise, saying why. A setting pykata cannot honour stops
the start with an error naming the setting and the fix: a pod never runs on
a filesystem other than the one its configuration asked for without a word
(issue 18: "virtio-fs" once ran the pod over 9p silently).

`pykata check` and `pykata env` show the same choice and reason as a start
makes (`choose`), so what they say is what a pod gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from pykata.config import Config
from pykata.errors import ConfigError

NINEP = "virtio-9p"
VIRTIO_FS = "virtio-fs"


@dataclass(frozen=True)
class SharedFsChoice:
    """The filesystem a sandbox gets (`kind`: NINEP or VIRTIO_FS), why, and
    for virtio-fs the daemon that serves it. `refusal` is set, and `kind`
    empty, when the configuration asks for what this host or configuration
    cannot give."""

    kind: str
    reason: str
    daemon: str = ""
    refusal: str = ""
    hint: str = ""


def choose(config: Config) -> SharedFsChoice:
    """The shared filesystem sandboxes get under `config` on this host."""
    setting = config.qemu.shared_fs
    if setting == NINEP:
        return SharedFsChoice(NINEP, "set in the configuration (shared_fs)")
    return SharedFsChoice(
        "", "", refusal=f'shared_fs = "{setting}" in {config.source} asks for virtio-fs, '
                        "which pykata does not implement yet",
        hint='set shared_fs = "virtio-9p"') if setting == VIRTIO_FS else SharedFsChoice(
        NINEP, "pykata does not implement virtio-fs yet; 9p is built into QEMU")


def require(config: Config) -> SharedFsChoice:
    """`choose`, or ConfigError when the setting cannot be honoured."""
    choice = choose(config)
    if choice.refusal:
        raise ConfigError(choice.refusal, hint=choice.hint or None)
    return choice
