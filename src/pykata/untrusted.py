"""Text that came from the guest, made safe to print on a terminal or in a log.

A hostile guest controls its console, its agent's error messages and every
string in its replies. Printed as they are, control characters and ANSI
escape sequences in them could rewrite what a user sees on the terminal (or
in a log read with `cat`). Everything but printable text, newlines and tabs
is shown escaped (`\\x1b`), and the length is bounded.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_TEXT = 4096


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def guest_text(text: str | bytes, limit: int = MAX_TEXT) -> str:
    """`text` from the guest with control characters escaped, at most about
    `limit` characters (the end is kept: the last lines say what went wrong)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > limit:
        text = "..." + text[-limit:]
    return _UNSAFE.sub(_escape, text)


def guest_line(text: str | bytes, limit: int = 512) -> str:
    """Like `guest_text`, with newlines escaped too: for one-line log fields."""
    return guest_text(text, limit).replace("\n", "\\n")
