"""What makes a VM restored from a template its own: fresh randomness and the
host's time.

Every clone of a template resumes with the template's random pool and its
clock stopped at the moment the template was saved. The host sends entropy
and its wall-clock time right after restore, before any container starts.
"""

from __future__ import annotations

import fcntl
import os
import time

# linux/random.h: _IO('R', 0x07): reseed the CRNG from the input pool now.
RNDRESEEDCRNG = 0x5207
MIN_SEED_BYTES = 16
MAX_SEED_BYTES = 4096
MAX_USEC = 1_000_000


def reseed(data: bytes, device: str = "/dev/urandom") -> None:
    """Mix `data` into the input pool, then make the kernel's generator (and
    every per-CPU one, on its next use) reseed from that pool. Raises
    ValueError for a seed of the wrong size, OSError from the kernel."""
    if not MIN_SEED_BYTES <= len(data) <= MAX_SEED_BYTES:
        raise ValueError(
            f"a reseed needs {MIN_SEED_BYTES} to {MAX_SEED_BYTES} bytes, not {len(data)}")
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {device}: {written} of {len(data)} bytes")
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_wall_clock(sec: int, usec: int) -> None:
    """Set CLOCK_REALTIME (CLOCK_MONOTONIC is not changed: timers keep their
    meaning). Raises ValueError for a time no host can send."""
    if sec <= 0 or not 0 <= usec < MAX_USEC:
        raise ValueError(f"{sec} s {usec} us is not a time after the Epoch")
    time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)
