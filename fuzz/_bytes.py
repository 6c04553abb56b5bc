"""A tiny byte format for structured fuzz inputs, read and written the same way.

`Cursor` reads a fuzz input as a sequence of fields and never fails: past the
end every number reads as 0 and every byte string as empty, so any mutation of
an input still means something. `Encoder` writes the same fields, so seed inputs
are built from real messages and decode back to exactly them.
"""

from __future__ import annotations

import struct

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Cursor:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._data)

    def take(self, size: int) -> bytes:
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def u8(self) -> int:
        if self._pos >= len(self._data):
            return 0
        value = self._data[self._pos]
        self._pos += 1
        return value

    def _fixed(self, fmt: struct.Struct) -> int:
        raw = self.take(fmt.size)
        if len(raw) < fmt.size:
            raw = raw.ljust(fmt.size, b"\0")
        value: int = fmt.unpack(raw)[0]
        return value

    def u16(self) -> int:
        return self._fixed(_U16)

    def u32(self) -> int:
        return self._fixed(_U32)

    def u64(self) -> int:
        return self._fixed(_U64)

    def blob(self) -> bytes:
        """A byte string with a u16 length in front (cut short at the input's end)."""
        return self.take(self.u16())

    def text(self) -> str:
        """A short string (u8 length); invalid UTF-8 becomes U+FFFD, as protobuf needs str."""
        return self.take(self.u8()).decode("utf-8", "replace")

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._pos)


class Encoder:
    """Writes what `Cursor` reads, field for field."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Encoder:
        self._parts.append(bytes([value & 0xFF]))
        return self

    def u16(self, value: int) -> Encoder:
        self._parts.append(_U16.pack(value & 0xFFFF))
        return self

    def u32(self, value: int) -> Encoder:
        self._parts.append(_U32.pack(value & 0xFFFF_FFFF))
        return self

    def u64(self, value: int) -> Encoder:
        self._parts.append(_U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF))
        return self

    def blob(self, data: bytes) -> Encoder:
        if len(data) > 0xFFFF:
            raise ValueError(f"a blob holds at most 65535 bytes, not {len(data)}")
        self.u16(len(data))
        self._parts.append(data)
        return self

    def text(self, value: str) -> Encoder:
        data = value.encode()
        if len(data) > 0xFF:
            raise ValueError(f"a text field holds at most 255 bytes, not {len(data)}")
        self.u8(len(data))
        self._parts.append(data)
        return self

    def raw(self, data: bytes) -> Encoder:
        self._parts.append(data)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
