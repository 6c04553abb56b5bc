"""`pykata env`: the configuration in effect, as TOML or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pykata import config as config_mod


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", help="show the configuration in effect")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(handler=run)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if scalars:
        if prefix:
            lines.append(f"[{prefix}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        lines.append("")
    for key, table in tables.items():
        lines.append(to_toml(table, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines)


def in_effect(cfg: config_mod.Config) -> dict[str, str]:
    """What the settings resolve to on this host: "auto" values made concrete,
    with the reason (the same choice a pod's start makes)."""
    from pykata.runtime import fs_choice

    share = fs_choice.choose(cfg)
    return {"shared_fs": share.kind or "refused",
            "shared_fs_reason": share.reason or f"{share.refusal} ({share.hint})"}


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    effect = in_effect(cfg)
    data = {"source": cfg.source, **cfg.to_dict(), "in_effect": effect}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"# configuration in effect: {cfg.source}")
        print(f"# shared filesystem pods get: {effect['shared_fs']} "
              f"({effect['shared_fs_reason']})")
        print(to_toml(cfg.to_dict()).rstrip())
    return 0
