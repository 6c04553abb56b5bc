"""Which shared filesystem a sandbox gets, and why: `[hypervisor.qemu] shared_fs`.

"virtio-9p" is QEMU's own 9p server; "virtio-fs" is a virtiofsd process per
sandbox (`hypervisor.virtiofsd`); "auto" picks virtio-fs where it can be
honoured and 9p otherwise, saying why. A setting pykata cannot honour stops
the start with an error naming the setting and the fix: a pod never runs on
a filesystem other than the one its configuration asked for without a word
("virtio-fs" once ran the pod over 9p silently).

virtio-fs cannot serve VMs from the factory, and a configuration that turns
the factory on gets 9p for every pod (with "auto", saying so), or is refused
(with "virtio-fs"), so a pod's filesystem never depends on where its VM came
from:
- VM templates: QEMU 7.2 cannot save a VM with a vhost-user-fs device (the
  device is marked unmigratable), and a clone maps the template's RAM
  private, where virtiofsd needs it shared with QEMU;
- the VM cache: a warm VM is handed from the cache to a pod's owner as
  descriptors, and its virtiofsd (the cache's child, bound to it) would have
  to be handed over too; pykata does not do that.

`pykata check` and `pykata env` show the same choice and reason as a start
makes (`choose`), so what they say is what a pod gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pykata.config import Config
from pykata.errors import ConfigError
from pykata.host.probes import find_virtiofsd

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


def _factory_conflict(config: Config) -> str:
    """Why the configuration's factory rules out virtio-fs ("" when it does not)."""
    if config.factory.enable_template:
        return ("VM templates are on ([factory] enable_template): QEMU 7.2 cannot save a VM "
                "with virtio-fs, and a template's clones map its memory private, where "
                "virtiofsd needs it shared")
    if config.factory.vm_cache_number > 0:
        return ("the VM cache is on ([factory] vm_cache_number): a warm VM's virtiofsd "
                "cannot be handed to a pod's owner")
    return ""


def _daemon(config: Config) -> tuple[str, str]:
    """virtiofsd's path, or "" and why there is none."""
    configured = config.qemu.virtio_fs_daemon
    if configured:
        if os.access(configured, os.X_OK):
            return configured, ""
        return "", f"virtio_fs_daemon {configured} is not an executable file"
    found = find_virtiofsd()
    if found:
        return found, ""
    return "", "virtiofsd is not installed (Debian's qemu-system-common has it)"


def choose(config: Config) -> SharedFsChoice:
    """The shared filesystem sandboxes get under `config` on this host."""
    setting = config.qemu.shared_fs
    if setting == NINEP:
        return SharedFsChoice(NINEP, "set in the configuration (shared_fs)")
    conflict = _factory_conflict(config)
    daemon, missing = _daemon(config)
    if setting == VIRTIO_FS:
        where = f'shared_fs = "virtio-fs" in {config.source}'
        if conflict:
            return SharedFsChoice("", "", refusal=f"{where} cannot be honoured: {conflict}",
                                  hint='set shared_fs = "virtio-9p" (or "auto", which then '
                                       'chooses 9p), or turn the factory off')
        if missing:
            return SharedFsChoice("", "", refusal=f"{where} cannot be honoured: {missing}",
                                  hint="install qemu-system-common, set [hypervisor.qemu] "
                                       'virtio_fs_daemon, or set shared_fs = "virtio-9p"')
        return SharedFsChoice(VIRTIO_FS, f"set in the configuration (shared_fs), served by "
                                         f"{daemon}", daemon=daemon)
    # "auto"
    if conflict:
        return SharedFsChoice(NINEP, f"auto: {conflict}")
    if missing:
        return SharedFsChoice(NINEP, f"auto: {missing}; 9p is built into QEMU")
    return SharedFsChoice(VIRTIO_FS, f"auto: virtiofsd found at {daemon}", daemon=daemon)


def require(config: Config) -> SharedFsChoice:
    """`choose`, or ConfigError when the setting cannot be honoured."""
    choice = choose(config)
    if choice.refusal:
        raise ConfigError(choice.refusal, hint=choice.hint or None)
    return choice
