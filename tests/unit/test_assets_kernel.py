"""Tests for pykata.assets.kernel: the key, host checks and the config check.

No test here compiles a kernel. The config test runs the real `tinyconfig` and
`olddefconfig` (about 15 s) on the real source tree, shared with the normal
cache so the tarball is extracted once for everyone.
"""

from __future__ import annotations

import os
import struct
import tarfile
from pathlib import Path

import pytest

from pykata.assets import AssetCache, KernelSpec, build_kernel
from pykata.assets.buildlog import BuildLog, StepFailed
from pykata.assets.elfnote import has_pvh_note
from pykata.assets.kernel import DEFAULT_TARBALL, FRAGMENT, source_tree
from pykata.errors import AssetsError, HostError


@pytest.fixture
def fragment(tmp_path: Path) -> Path:
    path = tmp_path / "pykata.config"
    path.write_text(FRAGMENT.read_text())
    return path


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    """A stand-in tarball: the key only looks at its path, size and mtime."""
    path = tmp_path / "linux-source-6.1.tar.xz"
    path.write_bytes(b"not really xz")
    return path


def test_key_is_stable_for_the_same_inputs(fragment: Path, tarball: Path) -> None:
    """Two specs with equal inputs have equal keys; touching the fragment changes nothing."""
    spec = KernelSpec(fragment=fragment, tarball=tarball)
    key = spec.key()
    assert KernelSpec(fragment=fragment, tarball=tarball).key() == key
    os.utime(fragment, (1, 1))  # the fragment counts by content, not mtime
    assert spec.key() == key
    assert len(key) == 16


def test_key_changes_with_the_fragment(fragment: Path, tarball: Path) -> None:
    """Adding an option to the fragment makes a new key."""
    spec = KernelSpec(fragment=fragment, tarball=tarball)
    before = spec.key()
    fragment.write_text(fragment.read_text() + "CONFIG_IKCONFIG=y\n")
    assert spec.key() != before


def test_key_changes_with_the_tarball_and_make_variables(fragment: Path, tarball: Path) -> None:
    """A new linux-source package (size/mtime) or other make variables make a new key."""
    spec = KernelSpec(fragment=fragment, tarball=tarball)
    before = spec.key()
    assert KernelSpec(fragment=fragment, tarball=tarball, make_vars=(("CC", "gcc-12"),)).key() != (
        before
    )
    os.utime(tarball, ns=(0, 123))
    assert spec.key() != before


def test_missing_tool_is_a_host_error_naming_the_package(
    tmp_path: Path, fragment: Path, tarball: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing on $PATH, the build stops before starting and names what to install."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    cache = AssetCache(tmp_path / "cache")
    with pytest.raises(HostError) as err:
        build_kernel(KernelSpec(fragment=fragment, tarball=tarball), cache)
    text = str(err.value)
    assert "make (package make)" in text and "flex (package flex)" in text
    assert "scripts/install-deps" in text
    assert not cache.root.exists() or not list(cache.root.glob("kernel-*"))


def test_missing_tarball_names_the_linux_source_package(tmp_path: Path, fragment: Path) -> None:
    """Without the tarball even the key cannot be computed; the error says which package."""
    spec = KernelSpec(fragment=fragment, tarball=tmp_path / "linux-source-6.1.tar.xz")
    with pytest.raises(HostError, match=r"package linux-source-6\.1"):
        spec.key()


@pytest.mark.skipif(not DEFAULT_TARBALL.exists(), reason="needs linux-source-6.1")
def test_option_that_does_not_stick_fails_the_build_and_leaves_nothing(tmp_path: Path) -> None:
    """A bogus option fails after olddefconfig, names the option, and leaves no artifact."""
    bogus = tmp_path / "pykata.config"
    bogus.write_text(FRAGMENT.read_text() + "CONFIG_PYKATA_NO_SUCH=y\n")
    cache = AssetCache(tmp_path / "cache", sources=AssetCache.default().source_dir)
    spec = KernelSpec(fragment=bogus)
    with pytest.raises(AssetsError) as err:
        build_kernel(spec, cache)
    text = str(err.value)
    assert "CONFIG_PYKATA_NO_SUCH=y" in text
    assert "did not stick" in text
    log = cache.failed_log("kernel", spec.key())
    assert str(log) in text and log.exists()
    assert "last lines of the build log" in text
    assert not list(cache.root.glob("kernel-*"))
    assert not list((cache.root / "tmp").glob("*"))


def _elf_with_notes(path: Path, notes: list[tuple[bytes, int]]) -> None:
    """A minimal ELF64 file: a header, one PT_NOTE program header, the notes."""
    body = b""
    for name, ntype in notes:
        padded = name + b"\0" * (-len(name) % 4)
        body += struct.pack("<III", len(name), 8, ntype) + padded + b"\0" * 8
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    path.write_bytes(ehdr + phdr + body)


def test_pvh_note_detection(tmp_path: Path) -> None:
    """Only an ELF with a Xen note of type 18 (PHYS32_ENTRY) counts as PVH-bootable."""
    pvh, other, not_elf = tmp_path / "pvh", tmp_path / "other", tmp_path / "text"
    _elf_with_notes(pvh, [(b"GNU\0", 3), (b"Xen\0", 18)])
    _elf_with_notes(other, [(b"Xen\0", 17)])
    not_elf.write_text("hello")
    assert has_pvh_note(pvh)
    assert not has_pvh_note(other)
    assert not has_pvh_note(not_elf)


def test_key_changes_with_the_patches(fragment: Path, tarball: Path, tmp_path: Path) -> None:
    """A patch, or a change to one, is a new kernel; the shipped patches are in the key."""
    patch = tmp_path / "0001-x.patch"
    patch.write_text("one\n")
    spec = KernelSpec(fragment=fragment, tarball=tarball, patches=(patch,))
    one = spec.key()
    assert KernelSpec(fragment=fragment, tarball=tarball, patches=()).key() != one
    patch.write_text("two\n")
    assert spec.key() != one
    assert KernelSpec().patches and all(p.suffix == ".patch" for p in KernelSpec().patches)


def _tiny_tree_tarball(path: Path) -> Path:
    src = path.parent / "tree-src" / "linux-9.9"
    src.mkdir(parents=True)
    (src / "Makefile").write_text("all:\n")
    (src / "timer.c").write_text("int period;\n")
    with tarfile.open(path, "w:xz") as tar:
        tar.add(src, arcname="linux-9.9")
    return path


_PATCH = """--- a/timer.c
+++ b/timer.c
@@ -1 +1,2 @@
 int period;
+int from_the_host;
"""


def test_source_tree_is_the_tarball_with_its_patches_applied(tmp_path: Path) -> None:
    """The patched tree gets a name of its own, so an unpatched one is never reused."""
    tarball = _tiny_tree_tarball(tmp_path / "linux-source-9.9.tar.xz")
    patch = tmp_path / "0001-host.patch"
    patch.write_text(_PATCH)
    cache = AssetCache(tmp_path / "cache", sources=tmp_path / "sources")
    log = BuildLog(tmp_path / "build.log")
    plain = source_tree(KernelSpec(tarball=tarball, patches=()), cache, log)
    patched = source_tree(KernelSpec(tarball=tarball, patches=(patch,)), cache, log)
    assert plain != patched
    assert (plain / "timer.c").read_text() == "int period;\n"
    assert (patched / "timer.c").read_text() == "int period;\nint from_the_host;\n"


def test_a_patch_that_does_not_apply_fails_and_leaves_no_tree(tmp_path: Path) -> None:
    tarball = _tiny_tree_tarball(tmp_path / "linux-source-9.9.tar.xz")
    patch = tmp_path / "0001-stale.patch"
    patch.write_text(_PATCH.replace(" int period;", " int another;"))
    cache = AssetCache(tmp_path / "cache", sources=tmp_path / "sources")
    with pytest.raises(StepFailed):
        source_tree(KernelSpec(tarball=tarball, patches=(patch,)), cache,
                    BuildLog(tmp_path / "build.log"))
    assert [p.name for p in (tmp_path / "sources").iterdir()] == ["lock"]
