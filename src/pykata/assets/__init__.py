"""Guest assets: the kernel and initrd every pykata VM boots.

Built from Debian packages on the host (linux-source, busybox-static, python3.11,
crun) plus pykata's own kernel config and agent, cached under a key of their
inputs, rebuilt when an input changes. The runtime calls `locate()` (cheap,
never builds); `pykata assets build` calls `build()`.

    paths = locate()            # AssetsError says "run `pykata assets build`"
    paths.kernel, paths.initrd  # what QEMU boots
"""

from __future__ import annotations

import logging

from pykata.assets.build import build
from pykata.assets.buildlog import Progress
from pykata.assets.cache import ENV_CACHE_DIR, AssetCache, default_cache_dir
from pykata.assets.initrd import InitrdArtifact, build_initrd
from pykata.assets.initrd_plan import Compression, InitrdSpec
from pykata.assets.kernel import KernelArtifact, KernelSpec, build_kernel
from pykata.assets.status import (
    BOOT_KERNEL,
    AssetPaths,
    AssetState,
    AssetStatus,
    locate,
    status,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BOOT_KERNEL",
    "ENV_CACHE_DIR",
    "AssetCache",
    "AssetPaths",
    "AssetState",
    "AssetStatus",
    "Compression",
    "InitrdArtifact",
    "InitrdSpec",
    "KernelArtifact",
    "KernelSpec",
    "Progress",
    "build",
    "build_initrd",
    "build_kernel",
    "default_cache_dir",
    "locate",
    "status",
]
