"""Bounded logs of what QEMU and the guest print, and escaping of guest text."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from pykata.hypervisor.capped_log import CappedLog, read_tail, rolled
from pykata.untrusted import guest_line, guest_text


async def test_a_flood_keeps_at_most_the_limit_and_the_newest_bytes(tmp_path: Path) -> None:
    """10 MiB through a 64 KiB log: never more than 64 KiB on disk, and the tail
    holds the last bytes written."""
    reader = asyncio.StreamReader()
    log = CappedLog(tmp_path / "console.log", 64 * 1024)
    log.start(reader)
    for i in range(160):
        reader.feed_data(bytes([65 + i % 26]) * 65536)
        await asyncio.sleep(0)
    reader.feed_data(b"\nthe last line\n")
    reader.feed_eof()
    await log.wait(5)
    sizes = [p.stat().st_size for p in (tmp_path / "console.log", rolled(tmp_path / "console.log"))]
    assert sum(sizes) <= 64 * 1024, sizes
    assert read_tail(tmp_path / "console.log", 100).endswith(b"\nthe last line\n")


def _letters(count: int) -> list[bytes]:
    return [bytes([65 + i % 26]) * 16384 for i in range(count)]


async def test_a_copier_follows_its_directory_through_a_rename(tmp_path: Path) -> None:
    """A pod that takes a cached VM renames the VM's directory while its
    copiers run: they keep writing, and rolling over, in the renamed
    directory, read their stream to its end (one left unread stalls QEMU or
    the guest's serial port) and leave no descriptor open."""
    warm, pod = tmp_path / "warm-1", tmp_path / "pod"
    warm.mkdir()
    open_before = len(os.listdir("/proc/self/fd"))
    reader = asyncio.StreamReader()
    log = CappedLog(warm / "console.log", 64 * 1024)
    log.start(reader)
    reader.feed_data(b"booted\n")
    await asyncio.sleep(0.01)
    os.rename(warm, pod)
    for chunk in _letters(20):  # 320 KiB: several roll-overs after the rename
        reader.feed_data(chunk)
        await asyncio.sleep(0)
    reader.feed_data(b"\nthe last line\n")
    reader.feed_eof()
    await log.wait(5)
    assert reader.at_eof(), "the copier stopped reading its stream"
    assert read_tail(pod / "console.log", 100).endswith(b"\nthe last line\n")
    sizes = [p.stat().st_size for p in (pod / "console.log", rolled(pod / "console.log"))]
    assert sum(sizes) <= 64 * 1024, sizes
    assert not warm.exists()
    assert len(os.listdir("/proc/self/fd")) == open_before


async def test_a_copier_whose_file_fails_still_drains_its_stream(tmp_path: Path) -> None:
    """With its directory gone (the file cannot roll over), the copier keeps
    reading and drops what it reads, without raising."""
    directory = tmp_path / "vm"
    directory.mkdir()
    reader = asyncio.StreamReader()
    log = CappedLog(directory / "qemu.stderr", 16384)
    log.start(reader)
    reader.feed_data(b"started\n")
    await asyncio.sleep(0.01)
    shutil.rmtree(directory)
    for chunk in _letters(8):
        reader.feed_data(chunk)
        await asyncio.sleep(0)
    reader.feed_eof()
    await log.wait(5)
    assert reader.at_eof(), "the copier stopped reading its stream"


def test_tail_spans_the_roll_over(tmp_path: Path) -> None:
    """A short current file is completed from the rolled one."""
    path = tmp_path / "log"
    rolled(path).write_bytes(b"old" * 10)
    path.write_bytes(b"new")
    assert read_tail(path, 9) == b"oldoldnew"
    assert read_tail(tmp_path / "missing") == b""


def test_guest_text_escapes_control_characters_and_is_bounded() -> None:
    """ANSI escapes, carriage returns and bidi overrides are shown escaped;
    newlines and tabs stay; the end of an overlong text is kept."""
    text = guest_text("ok\tline\n\x1b[2J\x1b]0;owned\x07\rfake prompt\u202e")
    assert text == "ok\tline\n\\x1b[2J\\x1b]0;owned\\x07\\x0dfake prompt\\u202e"
    assert guest_text(b"\xff") == "\ufffd" and guest_text("\x9b") == "\\x9b"
    long = guest_text("x" * 10000 + "END", limit=100)
    assert long.startswith("...") and long.endswith("END") and len(long) <= 103
    assert guest_line("a\nb") == "a\\nb"
