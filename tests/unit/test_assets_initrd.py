"""Tests for pykata.assets.initrd and initrd_plan: contents, key, build, and the guest Python.

The agent is replaced by a stand-in package written to a temp dir (the real
`pykata.agent.__main__` may not exist yet); it imports what the agent imports.
Nothing here boots a VM: the guest's Python is run in a chroot of the extracted
archive instead.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pykata.assets import AssetCache, Compression, InitrdSpec, build_initrd, pyscan
from pykata.assets.initrd_plan import SRC_ROOT, EntryKind, InitrdPlan, make_plan
from pykata.errors import AssetsError

pytestmark = pytest.mark.skipif(
    not all(Path(p).exists() for p in ("/usr/bin/python3.11", "/bin/busybox", "/usr/bin/crun")),
    reason="needs Debian's python3.11, busybox-static and crun",
)

STANDIN_MAIN = """\
import asyncio, json
import google.protobuf
import pykata.ttrpc
print("standin agent", json.dumps(google.protobuf.__version__))
"""


def write_standin(root: Path) -> Path:
    """The stand-in agent next to a snapshot of the pykata package.

    A snapshot, because the pykata sources may be edited while the tests run,
    and a key test must see only its own changes.
    """
    shutil.copytree(
        SRC_ROOT / "pykata", root / "pykata", ignore=shutil.ignore_patterns("__pycache__")
    )
    package = root / "pykata_standin_agent"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STANDIN_MAIN)
    return root


def standin_spec(root: Path, **kwargs: object) -> InitrdSpec:
    return InitrdSpec(
        entry_module="pykata_standin_agent.__main__",
        source_roots=(root,),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[InitrdSpec, AssetCache]:
    """One stand-in and one cache for the tests that only read: the scan runs once."""
    root = write_standin(tmp_path_factory.mktemp("standin"))
    return standin_spec(root), AssetCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def plan(shared: tuple[InitrdSpec, AssetCache]) -> InitrdPlan:
    return make_plan(*shared)


@pytest.fixture(scope="module")
def built(shared: tuple[InitrdSpec, AssetCache]) -> Path:
    return build_initrd(*shared).image


def paths(plan: InitrdPlan) -> dict[str, EntryKind]:
    return {e.path: e.kind for e in plan.entries}


def test_plan_has_busybox_python_agent_protobuf_and_crun(plan: InitrdPlan) -> None:
    """Every part the guest needs is listed at the path the guest expects it."""
    have = paths(plan)
    expected = {
        "/init": EntryKind.DATA,
        "/bin/busybox": EntryKind.FILE,
        "/bin/sh": EntryKind.SYMLINK,
        "/sbin/reboot": EntryKind.SYMLINK,
        "/usr/bin/python3.11": EntryKind.FILE,
        "/usr/bin/python3": EntryKind.SYMLINK,
        "/usr/bin/crun": EntryKind.FILE,
        "/lib64/ld-linux-x86-64.so.2": EntryKind.FILE,
        "/lib/x86_64-linux-gnu/libc.so.6": EntryKind.FILE,
        "/dev/console": EntryKind.CHARDEV,
        "/dev/null": EntryKind.CHARDEV,
        "/etc/passwd": EntryKind.DATA,
        "/proc": EntryKind.DIR,
        "/usr/lib/python3.11/os.pyc": EntryKind.PYC,
        "/usr/lib/python3.11/asyncio/base_events.pyc": EntryKind.PYC,
        "/usr/lib/python3.11/runpy.pyc": EntryKind.PYC,
        "/usr/lib/python3.11/lib-dynload": EntryKind.DIR,
        "/usr/lib/pykata/pykata/__init__.pyc": EntryKind.PYC,
        "/usr/lib/pykata/pykata/ttrpc/server.pyc": EntryKind.PYC,
        "/usr/lib/pykata/pykata/protocols/ttrpc_pb2.pyc": EntryKind.PYC,
        "/usr/lib/pykata/pykata_standin_agent/__main__.pyc": EntryKind.PYC,
        "/usr/lib/pykata/google/protobuf/message.pyc": EntryKind.PYC,
        "/usr/lib/pykata/google/_upb/_message.abi3.so": EntryKind.FILE,
    }
    assert {p: have.get(p) for p in expected} == expected
    dynload = [p for p in have if p.startswith("/usr/lib/python3.11/lib-dynload/")]
    assert any("_asyncio" in p for p in dynload) and any("_json" in p for p in dynload)
    for lib in ("libz.so.1", "libexpat.so.1", "libseccomp.so.2", "libstdc++.so.6"):
        assert f"/lib/x86_64-linux-gnu/{lib}" in have, lib


def test_plan_ships_bytecode_only_and_no_developer_tools(plan: InitrdPlan) -> None:
    """No .py sources; modules only modulefinder's over-approximation reaches stay out."""
    have = paths(plan)
    assert not [p for p in have if p.endswith(".py")]
    assert not [p for p in have if "/unittest/" in p or "/lib2to3/" in p or "/pydoc" in p]
    assert not [p for p in have if "/pykata/cli/" in p or "/pykata/assets/" in p]
    stdlib = Path("/usr/lib/python3.11/encodings")
    encodings = {f"{stdlib}/{f.stem}.pyc" for f in stdlib.glob("*.py")}
    assert encodings <= set(have)  # encodings complete, whatever the scan found


def test_key_comes_from_the_cached_scan(
    shared: tuple[InitrdSpec, AssetCache], plan: InitrdPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recomputing the key does not rescan: `locate` stays cheap."""

    def no_scan(_request: pyscan.ScanRequest) -> pyscan.ScanResult:
        raise AssertionError("rescanned")

    monkeypatch.setattr(pyscan, "scan", no_scan)
    assert make_plan(*shared).key == plan.key


def test_key_changes_with_agent_content_only(tmp_path: Path) -> None:
    """Editing an agent file changes the key; touching it or rewriting it unchanged does not."""
    root = write_standin(tmp_path / "standin")
    cache = AssetCache(tmp_path / "cache")
    spec = standin_spec(root)
    key = make_plan(spec, cache).key
    main = root / "pykata_standin_agent" / "__main__.py"
    os.utime(main, ns=(0, 0))
    main.write_text(main.read_text())
    assert make_plan(spec, cache).key == key
    main.write_text(main.read_text() + "print('changed')\n")
    assert make_plan(spec, cache).key != key


def test_key_changes_with_the_init_script_and_compression(
    tmp_path: Path, shared: tuple[InitrdSpec, AssetCache], plan: InitrdPlan
) -> None:
    """/init's content and the compression are inputs of the key."""
    spec, cache = shared
    init = tmp_path / "init"
    init.write_text("#!/bin/busybox sh\necho other init\n")
    other_init = dataclasses.replace(spec, init_script=init)
    gzipped = dataclasses.replace(spec, compression=Compression.GZIP)
    assert make_plan(other_init, cache).key != plan.key
    assert make_plan(gzipped, cache).key != plan.key


def test_missing_entry_module_is_an_assets_error(tmp_path: Path) -> None:
    """An agent that cannot be found fails before anything is built."""
    spec = InitrdSpec(entry_module="pykata_no_such_agent.__main__", source_roots=(tmp_path,))
    cache = AssetCache(tmp_path / "cache")
    with pytest.raises(AssetsError, match="pykata_no_such_agent"):
        build_initrd(spec, cache)
    assert not list(cache.root.glob("initrd-*"))


@pytest.mark.skipif(
    not (SRC_ROOT / "pykata" / "agent" / "__main__.py").exists(),
    reason="pykata.agent.__main__ is not written yet",
)
def test_real_agent_plan(tmp_path: Path) -> None:
    """The default spec scans the real agent and ships its package."""
    plan = make_plan(InitrdSpec(), AssetCache(tmp_path))
    assert "/usr/lib/pykata/pykata/agent/__main__.pyc" in paths(plan)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_built_image_reads_back_with_cpio(
    built: Path, shared: tuple[InitrdSpec, AssetCache]
) -> None:
    """GNU cpio lists as many entries as the manifest counts, device nodes included."""
    with open(built, "rb") as f:
        listing = subprocess.run(
            ["cpio", "-t", "-v", "--quiet"], stdin=f, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    artifact = build_initrd(*shared)  # up to date: the same artifact
    assert artifact.image == built
    assert len(listing) == artifact.manifest["file_count"]
    console = next(line for line in listing if line.endswith(" dev/console"))
    assert console.startswith("crw-------")
    init = next(line for line in listing if line.endswith(" init"))
    assert init.startswith("-rwxr-xr-x")


def test_second_build_is_a_cache_hit(built: Path, shared: tuple[InitrdSpec, AssetCache]) -> None:
    """Building again with unchanged inputs reports 'up to date' and rebuilds nothing."""
    lines: list[str] = []
    before = built.stat().st_mtime_ns
    build_initrd(*shared, progress=lines.append)
    assert lines and lines[0].startswith("initrd up to date (key ")
    assert built.stat().st_mtime_ns == before


def test_forced_rebuild_is_byte_identical(
    built: Path, shared: tuple[InitrdSpec, AssetCache]
) -> None:
    """The same inputs give the same bytes: sorted entries, mtime 0, hash-based .pyc."""
    before = hashlib.sha256(built.read_bytes()).hexdigest()
    rebuilt = build_initrd(*shared, force=True)
    assert rebuilt.image == built
    assert hashlib.sha256(built.read_bytes()).hexdigest() == before


def test_gzip_variant_is_the_same_archive_compressed(
    built: Path, shared: tuple[InitrdSpec, AssetCache]
) -> None:
    """Compression changes only the encoding: gunzip gives the uncompressed image back."""
    spec, cache = shared
    gz = build_initrd(dataclasses.replace(spec, compression=Compression.GZIP), cache)
    assert gzip.decompress(gz.image.read_bytes()) == built.read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_guest_python_imports_what_the_agent_needs(built: Path, tmp_path: Path) -> None:
    """In a chroot of the extracted image, python3 -S imports asyncio, protobuf and pykata."""
    root = tmp_path / "root"
    root.mkdir()
    with open(built, "rb") as f:
        subprocess.run(["cpio", "-i", "-d", "-m", "--quiet"], stdin=f, cwd=root, check=True)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/usr/lib/pykata", "PYTHONDONTWRITEBYTECODE": "1"}
    code = (
        "import asyncio, json, google.protobuf, pykata.ttrpc; "
        "from google.protobuf.internal import api_implementation; "
        "print('python-ok', api_implementation.Type())"
    )
    run = subprocess.run(
        [chroot, str(root), "/usr/bin/python3", "-S", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "python-ok upb"
    agent = subprocess.run(
        [chroot, str(root), "/usr/bin/python3", "-S", "-m", "pykata_standin_agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout.startswith("standin agent")
    assert not list(root.rglob("__pycache__"))
