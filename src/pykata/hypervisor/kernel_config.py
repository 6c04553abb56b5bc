"""Facts about the guest kernel read from the `.config` kept beside it.

`pykata assets build` installs a kernel's configuration as `config` next to
`vmlinux`. A kernel the user names may have none; then nothing here is known
and the guest works it out itself at boot, as any kernel does.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

CONFIG_NAME = "config"
# The tick rates Kconfig offers on x86; any other value is not a kernel's config.
_TICK_RATES = frozenset({100, 250, 300, 1000})
_MAX_CONFIG_BYTES = 1 << 20


# What the root image as a DAX device needs of the guest kernel: the e820
# pmem driver (X86_PMEM_LEGACY) makes the memory marked persistent a pmem
# device, ZONE_DEVICE gives its pages struct pages, and FS_DAX lets ext4 map
# them instead of copying. PCI: patch 0002 lives in its x86 setup.
DAX_ROOT_OPTIONS = ("CONFIG_PCI", "CONFIG_X86_PMEM_LEGACY", "CONFIG_ZONE_DEVICE",
                    "CONFIG_LIBNVDIMM", "CONFIG_BLK_DEV_PMEM", "CONFIG_FS_DAX",
                    "CONFIG_EXT4_FS")
# The patch without which a PCI-less machine's kernel never registers the
# persistent memory (assets/kernel/patches/).
DAX_ROOT_PATCH = "0002-persistent-memory-without-pci.patch"
MANIFEST_NAME = "manifest.json"


def options(kernel: Path) -> dict[str, str] | None:
    """The CONFIG_ options of the kernel at `kernel` with their values;
    None when no readable config is beside it."""
    config = kernel.parent / CONFIG_NAME
    try:
        st = config.stat()
    except OSError:
        return None
    return _options(config, st.st_mtime_ns, st.st_size)


def tick_rate(kernel: Path) -> int | None:
    """CONFIG_HZ of the kernel at `kernel`; None when no config is beside it."""
    value = (options(kernel) or {}).get("CONFIG_HZ", "")
    return int(value) if value.isdigit() and int(value) in _TICK_RATES else None


def missing_for_dax_root(kernel: Path) -> list[str] | None:
    """The options of DAX_ROOT_OPTIONS the kernel lacks (built in, not as a
    module: pykata's guest loads none); None when its config is unknown."""
    have = options(kernel)
    if have is None:
        return None
    return [name for name in DAX_ROOT_OPTIONS if have.get(name) != "y"]


def built_with_patch(kernel: Path, name: str) -> bool:
    """Whether `pykata assets build` made the kernel at `kernel` with the
    patch `name` (its manifest beside it lists the patches it applied)."""
    text = _read_small(kernel.parent / MANIFEST_NAME)
    if text is None:
        return False
    try:
        patches = json.loads(text).get("inputs", {}).get("patches", [])
    except (ValueError, AttributeError):
        return False
    return any(isinstance(p, list) and p and p[0] == name for p in patches)


def _read_small(path: Path) -> str | None:
    try:
        # O_NONBLOCK: a FIFO in the file's place cannot stall a VM's start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    if len(data) > _MAX_CONFIG_BYTES:
        return None
    return data.decode("ascii", "replace")


@functools.lru_cache(maxsize=8)
def _options(config: Path, mtime_ns: int, size: int) -> dict[str, str] | None:
    del mtime_ns  # in the cache key only: a rebuilt config is read again
    if size > _MAX_CONFIG_BYTES:
        return None
    text = _read_small(config)
    if text is None:
        return None
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_"):
            found[name] = value.strip()
    return found
