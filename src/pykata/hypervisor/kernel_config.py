"""Facts about the guest kernel read from the `.config` kept beside it.

`pykata assets build` installs a kernel's configuration as `config` next to
`vmlinux`. A kernel the user names may have none; then nothing here is known
and the guest works it out itself at boot, as any kernel does.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

CONFIG_NAME = "config"
# The tick rates Kconfig offers on x86; any other value is not a kernel's config.
_TICK_RATES = frozenset({100, 250, 300, 1000})
_MAX_CONFIG_BYTES = 1 << 20


def tick_rate(kernel: Path) -> int | None:
    """CONFIG_HZ of the kernel at `kernel`; None when no config is beside it."""
    config = kernel.parent / CONFIG_NAME
    try:
        st = config.stat()
    except OSError:
        return None
    return _tick_rate(config, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _tick_rate(config: Path, mtime_ns: int, size: int) -> int | None:
    del mtime_ns  # in the cache key only: a rebuilt config is read again
    if size > _MAX_CONFIG_BYTES:
        return None
    try:
        # O_NONBLOCK: a FIFO in the config's place cannot stall a VM's start.
        fd = os.open(config, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            text = f.read(_MAX_CONFIG_BYTES).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("CONFIG_HZ="):
            value = line.removeprefix("CONFIG_HZ=").strip()
            return int(value) if value.isdigit() and int(value) in _TICK_RATES else None
    return None
