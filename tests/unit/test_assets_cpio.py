"""Tests for pykata.assets.cpio: the newc archive writer, checked against GNU cpio."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata.assets.cpio import MAGIC, TRAILER, Archive, header

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")


# newc header fields, in order, each eight hex digits
FIELDS = ["ino", "mode", "uid", "gid", "nlink", "mtime", "filesize"]
FIELDS += ["devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check"]


@dataclass
class Parsed:
    name: str
    content: bytes
    fields: dict[str, int]

    def __getitem__(self, field: str) -> int:
        return self.fields[field]


def parse(data: bytes) -> list[Parsed]:
    """A minimal newc reader: every header field, the name and the content."""
    entries: list[Parsed] = []
    offset = 0
    while True:
        assert data[offset : offset + 6] == MAGIC
        fields = {
            n: int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i, n in enumerate(FIELDS)
        }
        name_start = offset + 110
        name = data[name_start : name_start + fields["namesize"] - 1].decode()
        offset = (name_start + fields["namesize"] + 3) & ~3
        content = data[offset : offset + fields["filesize"]]
        offset = (offset + fields["filesize"] + 3) & ~3
        if name == TRAILER:
            return entries
        entries.append(Parsed(name, content, fields))


def sample(tmp_path: Path) -> Archive:
    source = tmp_path / "source.bin"
    source.write_bytes(b"\x7fELF from the host\n" * 10)
    archive = Archive()
    archive.add_data("/etc/hostname", b"pykata\n")
    archive.add_file("/usr/bin/tool", source, 0o755)
    archive.add_symlink("/bin/sh", "/bin/busybox")
    archive.add_char_device("/dev/console", 5, 1)
    archive.add_dir("/tmp", 0o1777)
    return archive


def written(archive: Archive) -> bytes:
    out = io.BytesIO()
    size = archive.write(out)
    assert size == len(out.getvalue())
    return out.getvalue()


def test_header_layout_matches_the_newc_format() -> None:
    """A header is magic, 13 eight-digit hex fields, the NUL-terminated name, padding to 4."""
    raw = header(name="dev/null", ino=7, mode=0o20666, nlink=1, filesize=0, rdev=(1, 3))
    assert raw.startswith(b"070701" + b"%08X" % 7 + b"%08X" % 0o20666)
    assert raw[6 + 8 * 9 : 6 + 8 * 11] == b"0000000100000003"  # rdevmajor, rdevminor
    assert raw[110:119] == b"dev/null\0"
    assert len(raw) % 4 == 0


def test_entries_are_sorted_with_parents_first_and_owned_by_root(tmp_path: Path) -> None:
    """Implicit parent directories are added; mtime, uid and gid are 0; inodes count from 1."""
    entries = parse(written(sample(tmp_path)))
    names = [e.name for e in entries]
    assert names == sorted(names)
    assert {"usr", "usr/bin", "bin", "dev", "etc"} <= set(names)
    assert all(e["mtime"] == 0 and e["uid"] == 0 and e["gid"] == 0 for e in entries)
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    console = next(e for e in entries if e.name == "dev/console")
    assert stat.S_ISCHR(console["mode"])
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)


def test_output_does_not_depend_on_insertion_order(tmp_path: Path) -> None:
    """The same entries added in another order give byte-identical archives."""
    forward = sample(tmp_path)
    backward = Archive()
    for entry in reversed(forward.entries()):
        backward.add(entry)
    assert written(forward) == written(backward)


def test_invalid_paths_are_refused() -> None:
    """A path escaping the archive root is a programming error."""
    archive = Archive()
    with pytest.raises(ValueError):
        archive.add_data("../etc/passwd", b"")
    with pytest.raises(ValueError):
        archive.add_dir("/")


@needs_cpio
def test_gnu_cpio_lists_every_entry_with_its_type(tmp_path: Path) -> None:
    """`cpio -t -v` reads the archive and sees the device node and the symlink."""
    image = tmp_path / "initrd.img"
    image.write_bytes(written(sample(tmp_path)))
    with open(image, "rb") as f:
        listing = subprocess.run(
            ["cpio", "-t", "-v", "--quiet"], stdin=f, capture_output=True, text=True, check=True
        ).stdout
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in listing.splitlines()
    }
    assert lines["dev/console"].startswith("crw-------")
    assert re.search(r"\b5,\s+1\b", lines["dev/console"])
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("/bin/busybox")
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert lines["usr/bin/tool"].startswith("-rwxr-xr-x")


@needs_cpio
@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_gnu_cpio_extracts_contents_and_device_nodes(tmp_path: Path) -> None:
    """`cpio -i` recreates files, links and a real character device from the archive."""
    image = tmp_path / "initrd.img"
    image.write_bytes(written(sample(tmp_path)))
    root = tmp_path / "root"
    root.mkdir()
    with open(image, "rb") as f:
        subprocess.run(["cpio", "-i", "-d", "-m", "--quiet"], stdin=f, cwd=root, check=True)
    assert (root / "etc/hostname").read_bytes() == b"pykata\n"
    assert (root / "usr/bin/tool").read_bytes() == (tmp_path / "source.bin").read_bytes()
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    st = os.lstat(root / "dev/console")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


def test_a_source_file_that_changes_size_is_an_error(tmp_path: Path) -> None:
    """The header promises a size; a file growing during the write must not corrupt silently."""
    source = tmp_path / "grows"
    source.write_bytes(b"x")
    archive = Archive()
    archive.add_file("f", source)

    class Growing(io.BytesIO):
        def write(self, data: bytes, /) -> int:  # type: ignore[override]
            if data.startswith(MAGIC) and b"f\0" in data:
                source.write_bytes(b"xx")  # after the header, before the content
            return super().write(data)

    with pytest.raises(OSError, match="changed size"):
        archive.write(Growing())
