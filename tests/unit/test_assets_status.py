"""Tests for pykata.assets.status (locate, status) and `pykata assets` on the command line.

Built artifacts are faked (a directory with a manifest): these tests are about
finding assets and reporting on them, not about building them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pykata import assets
from pykata.assets import AssetCache, AssetState, InitrdSpec, KernelSpec, locate, status
from pykata.assets.cache import write_json
from pykata.assets.initrd_plan import make_plan
from pykata.assets.kernel import FRAGMENT
from pykata.cli import assets_cmd
from pykata.cli.main import build_parser, main
from pykata.errors import AssetsError

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11"
)


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> tuple[KernelSpec, InitrdSpec]:
    """A kernel spec on a stand-in tarball and an initrd spec with a tiny stand-in agent."""
    root = tmp_path_factory.mktemp("inputs")
    tarball = root / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"stand-in")
    package = root / "src" / "pykata_standin_agent"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import json\n")
    return (
        KernelSpec(fragment=FRAGMENT, tarball=tarball),
        InitrdSpec(entry_module="pykata_standin_agent.__main__", source_roots=(root / "src",)),
    )


@pytest.fixture
def cache(tmp_path: Path) -> AssetCache:
    return AssetCache(tmp_path / "cache")


def fake_artifact(
    cache: AssetCache, kind: str, key: str, files: dict[str, bytes], **extra: Any
) -> Path:
    path = cache.artifact_dir(kind, key)
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    write_json(
        path / "manifest.json",
        {"kind": kind, "key": key, "built_at": "2026-01-01T00:00:00Z", **extra},
    )
    return path


def fake_kernel(cache: AssetCache, key: str) -> Path:
    return fake_artifact(
        cache,
        "kernel",
        key,
        {"vmlinux": b"v" * 2048, "bzImage": b"b"},
        kernel_release="6.1.0-pykata",
    )


def test_locate_on_an_empty_cache_says_how_to_build(
    cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]
) -> None:
    """No kernel: the error names where it was looked for and `pykata assets build`."""
    kspec, ispec = specs
    with pytest.raises(AssetsError) as err:
        locate(cache, kspec, ispec)
    text = str(err.value)
    assert f"guest kernel not found at {cache.root}/kernel-{kspec.key()}" in text
    assert "pykata assets build" in text


def test_locate_without_initrd(cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]) -> None:
    """With only the kernel built, the initrd is the one reported missing."""
    kspec, ispec = specs
    fake_kernel(cache, kspec.key())
    with pytest.raises(AssetsError, match=r"guest initrd not found at .*pykata assets build"):
        locate(cache, kspec, ispec)


def test_locate_finds_both_and_boots_vmlinux_by_default(
    cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]
) -> None:
    """With both built for the current keys, locate returns their paths and the release."""
    kspec, ispec = specs
    kdir = fake_kernel(cache, kspec.key())
    idir = fake_artifact(cache, "initrd", make_plan(ispec, cache).key, {"initrd.img": b"0707"})
    paths = locate(cache, kspec, ispec)
    assert assets.BOOT_KERNEL == "vmlinux"
    assert paths == assets.AssetPaths(
        kernel=kdir / "vmlinux",
        vmlinux=kdir / "vmlinux",
        bzimage=kdir / "bzImage",
        initrd=idir / "initrd.img",
        kernel_release="6.1.0-pykata",
        image=idir / "root.img",
    )
    assert locate(cache, kspec, ispec, boot_kernel="bzImage").kernel == kdir / "bzImage"


def test_stale_kernel_is_reported_as_out_of_date(
    cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]
) -> None:
    """Only a kernel from older inputs: status says stale, locate says out of date."""
    kspec, ispec = specs
    old = fake_kernel(cache, "0000000000000000")
    with pytest.raises(AssetsError) as err:
        locate(cache, kspec, ispec)
    assert f"guest kernel at {old} is out of date (its inputs changed)" in str(err.value)
    assert "pykata assets build" in str(err.value)
    row = status(cache, kspec, ispec)[0]
    assert (row.kind, row.state, row.key, row.built_key) == (
        "kernel",
        AssetState.STALE,
        kspec.key(),
        "0000000000000000",
    )


def test_status_on_an_empty_cache_says_missing(
    cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]
) -> None:
    """Both kinds are missing, each with the key a build would produce."""
    rows = status(cache, *specs)
    assert [(r.kind, r.state) for r in rows] == [
        ("kernel", AssetState.MISSING),
        ("initrd", AssetState.MISSING),
    ]
    assert all(r.key and r.path is None and r.size is None for r in rows)


def test_status_of_built_assets(cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec]) -> None:
    """Built rows carry the boot kernel's path and size, build time and kernel release."""
    kspec, ispec = specs
    kdir = fake_kernel(cache, kspec.key())
    fake_artifact(cache, "initrd", make_plan(ispec, cache).key, {"initrd.img": b"x" * 10})
    kernel, initrd = status(cache, kspec, ispec)
    assert kernel.state is AssetState.BUILT and initrd.state is AssetState.BUILT
    assert (kernel.path, kernel.size, kernel.kernel_release) == (
        kdir / "vmlinux",
        2048,
        "6.1.0-pykata",
    )
    assert kernel.built_at == "2026-01-01T00:00:00Z"
    assert initrd.size == 10
    assert json.loads(json.dumps([kernel.to_json(), initrd.to_json()]))[0]["state"] == "built"


def test_status_reports_an_agent_that_cannot_be_scanned(
    cache: AssetCache, specs: tuple[KernelSpec, InitrdSpec], tmp_path: Path
) -> None:
    """An initrd whose inputs cannot be computed is an error row, not an exception."""
    broken = InitrdSpec(entry_module="pykata_no_such_agent.__main__", source_roots=(tmp_path,))
    kernel, initrd = status(cache, specs[0], broken)
    assert kernel.state is AssetState.MISSING
    assert initrd.state is AssetState.ERROR
    assert initrd.detail and "pykata_no_such_agent" in initrd.detail


def test_cli_status_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pykata assets status` prints a table, `--json` the same rows; exit 1 unless all built."""
    monkeypatch.setenv(assets.ENV_CACHE_DIR, str(tmp_path))
    rows = [
        assets.AssetStatus(
            "kernel",
            AssetState.BUILT,
            "k1",
            Path("/c/vmlinux"),
            3 * 1024 * 1024,
            "2026-01-01T00:00:00Z",
            "k1",
            "6.1.0-pykata",
        ),
        assets.AssetStatus("initrd", AssetState.MISSING, "k2"),
    ]
    monkeypatch.setattr(assets, "status", lambda: rows)
    assert main(["assets", "status"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KIND", "STATE", "SIZE", "PATH", "KEY", "BUILT-AT"]
    assert out[1].split() == [
        "kernel",
        "built",
        "3.0",
        "MiB",
        "/c/vmlinux",
        "k1",
        "2026-01-01T00:00:00Z",
    ]
    assert out[2].split() == ["initrd", "missing", "-", "-", "k2", "-"]
    assert "release 6.1.0-pykata" in out[3]
    assert main(["assets", "status", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["state"], r["size"]) for r in data] == [
        ("kernel", "built", 3 * 1024 * 1024),
        ("initrd", "missing", None),
    ]


def test_cli_build_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kernel-only/--initrd-only build one kind, --force is passed on, progress is printed."""
    calls: list[tuple[str, bool]] = []

    def fake_build(kind: str) -> Any:
        def run(*, force: bool, progress: Any) -> None:
            calls.append((kind, force))
            progress(f"{kind} up to date (key x)")

        return run

    monkeypatch.setattr(assets, "build_kernel", fake_build("kernel"))
    monkeypatch.setattr(assets, "build_initrd", fake_build("initrd"))
    assert main(["assets", "build", "--kernel-only", "--force"]) == 0
    assert main(["assets", "build", "--initrd-only"]) == 0
    assert calls == [("kernel", True), ("initrd", False)]
    assert capsys.readouterr().out.splitlines() == [
        "kernel up to date (key x)",
        "initrd up to date (key x)",
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["assets", "build", "--kernel-only", "--initrd-only"])


def test_human_size() -> None:
    """Sizes print in binary units with one decimal."""
    assert [assets_cmd.human_size(n) for n in (None, 512, 2048, 34113820, 3 << 30)] == [
        "-",
        "512 B",
        "2.0 KiB",
        "32.5 MiB",
        "3.0 GiB",
    ]
