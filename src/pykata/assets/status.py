"""What the cache holds compared with what the current inputs call for.

`locate` is on the VM start path: it computes both keys (a few stats and small
reads, the module scan being cached) and checks two directories; it never builds.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.assets import initrd_plan, kernel
from pykata.assets.cache import AssetCache, Installed
from pykata.assets.initrd import IMAGE
from pykata.assets.initrd_plan import InitrdSpec
from pykata.assets.kernel import KernelSpec
from pykata.assets.root_image import ROOT_IMAGE
from pykata.errors import AssetsError, PykataError

log = logging.getLogger(__name__)

# Which kernel image the runtime boots. vmlinux enters through PVH with no
# decompression step; bzImage is kept next to it for comparison and for
# machines whose firmware path needs it.
BOOT_KERNEL = kernel.VMLINUX
BUILD_HINT = "run `pykata assets build`"


class AssetState(enum.StrEnum):
    BUILT = "built"  # the cache holds an artifact for the current inputs
    STALE = "stale"  # only artifacts built from older inputs
    MISSING = "missing"  # nothing built
    ERROR = "error"  # the current inputs cannot be determined (see detail)


@dataclass(frozen=True)
class AssetPaths:
    """The guest assets a VM boots with."""

    kernel: Path  # the image the runtime boots (BOOT_KERNEL)
    vmlinux: Path
    bzimage: Path
    initrd: Path
    kernel_release: str
    # The same files as a read-only ext4 image (guest_root = "image"); built
    # next to the initrd when the build runs as root, else absent.
    image: Path | None = None


@dataclass(frozen=True)
class AssetStatus:
    kind: str
    state: AssetState
    key: str | None  # the key the current inputs call for
    path: Path | None = None  # the main file of the built (or stale) artifact
    size: int | None = None
    built_at: str | None = None
    built_key: str | None = None
    kernel_release: str | None = None
    detail: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state.value,
            "key": self.key,
            "path": None if self.path is None else str(self.path),
            "size": self.size,
            "built_at": self.built_at,
            "built_key": self.built_key,
            "kernel_release": self.kernel_release,
            "detail": self.detail,
            "sizes": self.sizes,
        }


def status(
    cache: AssetCache | None = None,
    kernel_spec: KernelSpec | None = None,
    initrd_spec: InitrdSpec | None = None,
    boot_kernel: str = BOOT_KERNEL,
) -> list[AssetStatus]:
    """One row per asset kind: built, stale, missing, or error."""
    cache = cache or AssetCache.default()
    kernel_spec = kernel_spec or KernelSpec()
    initrd_spec = initrd_spec or InitrdSpec()
    return [
        _status(cache, kernel.KIND, kernel_spec.key, boot_kernel),
        _status(
            cache, initrd_plan.KIND, lambda: initrd_plan.make_plan(initrd_spec, cache).key, IMAGE
        ),
    ]


def locate(
    cache: AssetCache | None = None,
    kernel_spec: KernelSpec | None = None,
    initrd_spec: InitrdSpec | None = None,
    boot_kernel: str = BOOT_KERNEL,
) -> AssetPaths:
    """The built assets for the current inputs; AssetsError says how to get them."""
    cache = cache or AssetCache.default()
    kernel_spec = kernel_spec or KernelSpec()
    initrd_spec = initrd_spec or InitrdSpec()
    kdir = _require(cache, "kernel", "guest kernel", kernel_spec.key())
    idir = _require(cache, "initrd", "guest initrd", initrd_plan.make_plan(initrd_spec, cache).key)
    return AssetPaths(
        kernel=kdir.path / boot_kernel,
        vmlinux=kdir.path / kernel.VMLINUX,
        bzimage=kdir.path / kernel.BZIMAGE,
        initrd=idir.path / IMAGE,
        kernel_release=str(kdir.manifest.get("kernel_release", "")),
        image=idir.path / ROOT_IMAGE,
    )


def _require(cache: AssetCache, kind: str, what: str, key: str) -> Installed:
    found = cache.find(kind, key)
    if found is not None:
        return found
    older = cache.installed(kind)
    if older:
        raise AssetsError(
            f"{what} at {older[0].path} is out of date (its inputs changed)", hint=BUILD_HINT
        )
    raise AssetsError(f"{what} not found at {cache.artifact_dir(kind, key)}", hint=BUILD_HINT)


def _status(
    cache: AssetCache, kind: str, compute_key: Callable[[], str], main_file: str
) -> AssetStatus:
    installed = cache.installed(kind)
    try:
        key = compute_key()
    except PykataError as exc:
        log.debug("cannot compute the %s key: %s", kind, exc)
        newest = installed[0] if installed else None
        return _row(kind, AssetState.ERROR, None, newest, main_file, detail=str(exc))
    current = next((i for i in installed if i.key == key), None)
    if current is not None:
        return _row(kind, AssetState.BUILT, key, current, main_file)
    if installed:
        return _row(
            kind, AssetState.STALE, key, installed[0], main_file, detail="built from older inputs"
        )
    return _row(kind, AssetState.MISSING, key, None, main_file)


def _row(
    kind: str,
    state: AssetState,
    key: str | None,
    found: Installed | None,
    main_file: str,
    detail: str | None = None,
) -> AssetStatus:
    if found is None:
        return AssetStatus(kind, state, key, detail=detail)
    path = found.path / main_file
    sizes = found.manifest.get("sizes")
    release = found.manifest.get("kernel_release")
    return AssetStatus(
        kind,
        state,
        key,
        path=path,
        size=path.stat().st_size if path.exists() else None,
        built_at=found.built_at or None,
        built_key=found.key,
        kernel_release=str(release) if release else None,
        detail=detail,
        sizes=dict(sizes) if isinstance(sizes, dict) else {},
    )
