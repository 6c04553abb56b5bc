"""A host process's figures, from /proc/<pid>: CPU seconds, resident and
proportional memory, threads, open descriptors and I/O bytes.

The monitor runs as root and reads these for QEMU and for each pod's owner.
A process that ends half-way through leaves the figures it had; one that is
gone gives None."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessFigures:
    cpu_seconds: float
    resident_bytes: int
    proportional_bytes: int
    threads: int
    open_fds: int
    read_bytes: int
    write_bytes: int


def _fields(text: str) -> dict[str, int]:
    """`Name: value [kB]` lines (status, io, smaps_rollup), in bytes for kB."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name.strip()] = int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def process_figures(pid: int, proc: Path = PROC) -> ProcessFigures | None:
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
    except OSError:
        return None
    # After the command in parentheses (which may hold spaces), proc(5)'s
    # fields from 3: utime is 14, stime 15, num_threads 20, rss 24.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 22:
        return None
    io = _fields(_read(base / "io"))
    # smaps_rollup: the kernel sums every mapping; Pss shares each page among
    # the processes mapping it (a clone's template pages included).
    pss = _fields(_read(base / "smaps_rollup")).get("Pss", 0)
    fds = 0
    with contextlib.suppress(OSError):
        fds = len(os.listdir(base / "fd"))
    return ProcessFigures(
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _TICKS,
        resident_bytes=int(fields[21]) * _PAGE,
        proportional_bytes=pss,
        threads=int(fields[17]),
        open_fds=fds,
        read_bytes=io.get("read_bytes", 0),
        write_bytes=io.get("write_bytes", 0))
