"""Does an ELF kernel image carry a PVH entry point?

QEMU boots an uncompressed `vmlinux` directly (no bzImage decompression, which
is slow under emulation) only if the image has a Xen ELF note of type
XEN_ELFNOTE_PHYS32_ENTRY (18) in a PT_NOTE segment: that is where QEMU's ELF
loader looks for the 32-bit PVH entry address (xen/include/public/elfnote.h).
Stripping must keep that note; this check proves it did.
"""

from __future__ import annotations

import struct
from pathlib import Path

PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
_ELF64_LE = b"\x7fELF\x02\x01"


def has_pvh_note(path: Path) -> bool:
    """True when `path` is a little-endian ELF64 file with a PVH entry note."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or not ident.startswith(_ELF64_LE):
            return False
        (phoff,) = struct.unpack_from("<Q", ident, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, p_offset, _v, _p, p_filesz = struct.unpack_from(
                "<IIQQQQ", table, i * phentsize
            )
            if p_type != PT_NOTE:
                continue
            f.seek(p_offset)
            if _has_note(f.read(p_filesz), b"Xen", XEN_ELFNOTE_PHYS32_ENTRY):
                return True
    return False


def _has_note(data: bytes, name: bytes, note_type: int) -> bool:
    offset = 0
    while offset + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, offset)
        offset += 12
        note_name = data[offset : offset + namesz].rstrip(b"\0")
        offset += (namesz + 3) & ~3
        offset += (descsz + 3) & ~3
        if note_name == name and ntype == note_type:
            return True
    return False
