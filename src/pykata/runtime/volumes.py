"""Host paths a container's spec binds in (volumes), shared into the guest.

A bind mount in the OCI spec names a host path, which means nothing inside the
VM: crun in the guest would bind the guest's own file of that name, or fail.
So each one is bind-mounted on the host below the sandbox's export, once per
pod (`share.SandboxShare.acquire_volume`: the pod's containers binding one
host path alike share the mount), which the guest sees over 9p or virtio-fs,
and the spec's source is rewritten to the guest's path of it. The spec keeps
its options, so crun applies `ro` and propagation in the guest too; a
read-only volume is also read-only on the host side of the share, all the way
down, so the guest cannot write through the shared filesystem whatever it does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.errors import SpecError

_BIND_OPTIONS = {"bind", "rbind"}


@dataclass(frozen=True)
class Volume:
    """One host path to share, and how (runtime.share mounts it for the pod)."""

    source: Path
    recursive: bool
    readonly: bool
    is_dir: bool


def is_bind(entry: dict[str, Any]) -> bool:
    options = entry.get("options") or []
    return entry.get("type") == "bind" or any(o in _BIND_OPTIONS for o in options)


def plan_volumes(mounts: list[dict[str, Any]], bundle: Path | None) -> list[tuple[int, Volume]]:
    """The spec's bind mounts, by their index in `mounts`, checked on the host.

    A source that is missing, relative without a bundle, or neither a directory
    nor a regular file (a device node or socket cannot cross 9p) is refused.
    """
    planned: list[tuple[int, Volume]] = []
    for index, entry in enumerate(mounts):
        if not is_bind(entry):
            continue
        destination = str(entry.get("destination", ""))
        raw = str(entry.get("source", ""))
        if not raw:
            raise SpecError(f"volume {destination!r}: the bind mount has no source")
        source = Path(raw)
        if not source.is_absolute():
            if bundle is None:
                raise SpecError(f"volume {destination!r}: relative source {raw!r}",
                                hint="give the host path as an absolute path")
            source = bundle / source
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise SpecError(f"volume {destination!r}: host path {source}: {exc.strerror}",
                            hint="create it first, or fix the mount's source") from exc
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise SpecError(
                f"volume {destination!r}: host path {source} is neither a directory "
                "nor a regular file",
                hint="device nodes, sockets and pipes cannot be shared into the VM")
        options = entry.get("options") or []
        planned.append((index, Volume(
            source=source,
            recursive="rbind" in options or entry.get("type") == "rbind",
            readonly="ro" in options, is_dir=stat.S_ISDIR(mode),
        )))
    return planned
