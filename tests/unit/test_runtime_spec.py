"""OCI bundles: the checks that name the field, and the spec `pykata run` writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pykata.errors import SpecError
from pykata.host.mounts import _split_options, unescape_mountinfo
from pykata.runtime.spec import check_spec, default_spec, load_bundle


def _good() -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"}}


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s.pop("process"), "process must be an object"),
    (lambda s: s["process"].update(args="true"), "process.args"),
    (lambda s: s["process"].update(args=[]), "process.args"),
    (lambda s: s["process"].update(cwd="tmp"), "process.cwd must be an absolute path"),
    (lambda s: s.pop("root"), "root.path"),
    (lambda s: s["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "hard": "x", "soft": 1}]),
     "process.rlimits[0].hard"),
])
def test_check_spec_names_the_field(change: Any, field: str) -> None:
    """Every malformed field is reported by its path."""
    spec = _good()
    change(spec)
    with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_spec(spec, "config.json")


def test_load_bundle_resolves_a_relative_root(tmp_path: Path) -> None:
    """root.path is relative to the bundle; missing or broken JSON is named."""
    with pytest.raises(SpecError, match=r"config\.json does not exist"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SpecError, match="is not valid JSON"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_good()))
    spec, root = load_bundle(tmp_path)
    assert root == tmp_path / "rootfs" and spec["process"]["args"] == ["true"]


def test_default_spec_is_valid() -> None:
    """The spec `pykata run` writes passes the same checks; a terminal gets TERM."""
    spec = default_spec(["sh"], terminal=True, env=["A=1"])
    check_spec(spec, "default")
    assert "TERM=xterm" in spec["process"]["env"] and "A=1" in spec["process"]["env"]
    assert {"type": "network"} not in spec["linux"]["namespaces"]


def test_mount_options_split_and_mountinfo_unescape() -> None:
    """Flag options become mount flags, the rest filesystem data; mountinfo's
    octal escapes are decoded."""
    flags, data = _split_options(["ro", "nosuid", "lowerdir=/a", "rw", "upperdir=/b"])
    assert flags == 0x1 | 0x2 and data == "lowerdir=/a,upperdir=/b"
    assert unescape_mountinfo(r"/run/my\040dir\011x") == "/run/my dir\tx"
