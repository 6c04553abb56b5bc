"""Configuration texts for the benchmarks' templated and cached runs."""

from __future__ import annotations

import re

_FACTORY_SECTION = re.compile(r"(?ms)^\[factory\]\s*$.*?(?=^\[|\Z)")


def with_factory(text: str, **settings: object) -> str:
    """`text` (a pykata configuration) with its [factory] section replaced by
    one holding `settings` (strings quoted, booleans lowercase)."""
    lines = ["", "[factory]"]
    for key, value in settings.items():
        rendered = (str(value).lower() if isinstance(value, bool)
                    else f'"{value}"' if isinstance(value, str) else str(value))
        lines.append(f"{key} = {rendered}")
    return _FACTORY_SECTION.sub("", text) + "\n".join(lines) + "\n"
