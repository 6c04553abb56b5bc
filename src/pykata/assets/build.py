"""Build both guest assets: the kernel, then the initrd.

Everything that can fail fast is checked before the kernel build starts
(several minutes): both kinds' host tools and the agent's module scan.
"""

from __future__ import annotations

from pykata.assets import host, initrd_plan
from pykata.assets.buildlog import Progress, no_progress
from pykata.assets.cache import AssetCache
from pykata.assets.initrd import build_initrd
from pykata.assets.initrd_plan import InitrdSpec
from pykata.assets.kernel import KernelSpec, build_kernel, check_host
from pykata.assets.status import BOOT_KERNEL, AssetPaths, locate


def build(
    force: bool = False,
    kernel: bool = True,
    initrd: bool = True,
    log: Progress = no_progress,
    *,
    cache: AssetCache | None = None,
    kernel_spec: KernelSpec | None = None,
    initrd_spec: InitrdSpec | None = None,
    jobs: int | None = None,
    boot_kernel: str = BOOT_KERNEL,
) -> AssetPaths:
    """Build what is out of date (everything asked for when `force`) and locate the result.

    `log` receives one progress line per step. Building only one kind still
    needs the other one in the cache for the returned paths; use
    `build_kernel`/`build_initrd` alone for that.
    """
    cache = cache or AssetCache.default()
    kernel_spec = kernel_spec or KernelSpec()
    initrd_spec = initrd_spec or InitrdSpec()
    if kernel:
        check_host(kernel_spec)
    if initrd:
        host.require(initrd_plan.requirements(initrd_spec), "guest initrd")
        initrd_plan.make_plan(initrd_spec, cache)
    if kernel:
        build_kernel(kernel_spec, cache, force=force, progress=log, jobs=jobs)
    if initrd:
        build_initrd(initrd_spec, cache, force=force, progress=log)
    return locate(cache, kernel_spec, initrd_spec, boot_kernel)
