"""Tests for pykata.assets.cache, buildlog and host: locations, atomic builds, locking."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from pykata.assets import host
from pykata.assets.cache import ENV_CACHE_DIR, AssetCache, default_cache_dir
from pykata.errors import AssetsError, HostError


def test_cache_dir_env_override_then_root_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$PYKATA_CACHE_DIR wins; root uses /var/cache/pykata; others $XDG_CACHE_HOME/pykata."""
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "override"))
    assert default_cache_dir() == tmp_path / "override"
    monkeypatch.delenv(ENV_CACHE_DIR)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/pykata")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pykata"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pykata"


def test_commit_moves_the_build_into_place_with_manifest_and_log(tmp_path: Path) -> None:
    """A committed build is a complete keyed directory; nothing is left in tmp/."""
    cache = AssetCache(tmp_path)
    with cache.lock(), cache.staging("kernel", "abc") as stage:
        stage.log.step("doing things")
        (stage.path / "vmlinux").write_bytes(b"image")
        (stage.work / "scratch").write_bytes(b"big intermediate")
        final = stage.commit({"kernel_release": "6.1-pykata"})
    assert final == tmp_path / "kernel-abc"
    assert sorted(p.name for p in final.iterdir()) == ["build.log", "manifest.json", "vmlinux"]
    found = cache.find("kernel", "abc")
    assert found is not None and found.manifest["kernel_release"] == "6.1-pykata"
    assert found.manifest["key"] == "abc" and found.built_at
    assert "doing things" in (final / "build.log").read_text()
    assert final.stat().st_mode & 0o777 == 0o755
    assert (final / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "tmp").iterdir())


def test_failed_step_leaves_no_artifact_and_quotes_the_log(tmp_path: Path) -> None:
    """A failing command becomes an AssetsError with the log's tail; the log is kept."""
    cache = AssetCache(tmp_path)
    with pytest.raises(AssetsError) as err, cache.lock(), cache.staging("initrd", "k1") as stage:
        stage.log.run(["sh", "-c", "echo compiler says no >&2; exit 3"])
    text = str(err.value)
    assert "exited with status 3" in text and "compiler says no" in text
    assert str(cache.failed_log("initrd", "k1")) in text
    assert "compiler says no" in cache.failed_log("initrd", "k1").read_text()
    assert cache.find("initrd", "k1") is None
    assert not list(tmp_path.glob("initrd-*"))
    assert not list((tmp_path / "tmp").iterdir())


def test_interrupted_build_is_cleaned_up_and_not_wrapped(tmp_path: Path) -> None:
    """Other exceptions (e.g. Ctrl-C) propagate unchanged, still leaving nothing behind."""
    cache = AssetCache(tmp_path)
    with pytest.raises(KeyboardInterrupt), cache.lock(), cache.staging("kernel", "k2"):
        raise KeyboardInterrupt
    assert not list(tmp_path.glob("kernel-*"))


def test_forced_rebuild_replaces_the_old_artifact(tmp_path: Path) -> None:
    """Committing a key that already exists swaps the directory in one rename."""
    cache = AssetCache(tmp_path)
    for content in (b"old", b"new"):
        with cache.lock(), cache.staging("kernel", "same") as stage:
            (stage.path / "vmlinux").write_bytes(content)
            stage.commit({})
    assert (tmp_path / "kernel-same" / "vmlinux").read_bytes() == b"new"
    assert len(cache.installed("kernel")) == 1


def test_lock_serializes_builds(tmp_path: Path) -> None:
    """A second builder waits for the first one's lock and says so."""
    cache = AssetCache(tmp_path)
    events: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with cache.lock():
            holding.set()
            time.sleep(0.3)
            events.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with cache.lock(progress=lambda line: events.append("waiting" if "waiting" in line else line)):
        events.append("second in")
    thread.join()
    assert events == ["waiting", "first done", "second in"]


def test_prune_keeps_the_newest_two(tmp_path: Path) -> None:
    """Old artifacts of a kind are removed, the current and the previous one stay."""
    cache = AssetCache(tmp_path)
    for key in ("a", "b", "c"):
        with cache.lock(), cache.staging("initrd", key) as stage:
            stage.commit({})
        time.sleep(1.01)  # built_at has one-second resolution
    removed = cache.prune("initrd")
    assert removed == [tmp_path / "initrd-a"]
    assert [i.key for i in cache.installed("initrd")] == ["c", "b"]


def test_missing_requirements_name_their_packages() -> None:
    """host.require lists every missing tool or file with its Debian package."""
    with pytest.raises(HostError) as err:
        host.require(
            [
                host.tool("sh", "dash"),
                host.tool("pykata-no-such-tool", "pykata-tools"),
                host.file("/nonexistent/busybox", "busybox-static"),
            ],
            "guest initrd",
        )
    text = str(err.value)
    assert "pykata-no-such-tool (package pykata-tools)" in text
    assert "/nonexistent/busybox (package busybox-static)" in text
    assert "dash" not in text.split(":")[1]
    assert "scripts/install-deps" in text and "apt-get install busybox-static pykata-tools" in text


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_shared_libraries_include_the_elf_interpreter() -> None:
    """ldd's list has resolved library paths and the loader; a static binary has none."""
    libs = host.shared_libraries(Path("/bin/sh"))
    assert any(p.name.startswith("libc.so") for p in libs)
    assert any(p.name.startswith("ld-linux") for p in libs)
    assert all(p.is_absolute() for p in libs)
    if Path("/bin/busybox").exists() and "static" in os.popen("file -b /bin/busybox").read():
        assert host.shared_libraries(Path("/bin/busybox")) == []


def test_step_failed_for_a_missing_command(tmp_path: Path) -> None:
    """A command that cannot even start is a failed step, not an OSError."""
    cache = AssetCache(tmp_path)
    with (
        pytest.raises(AssetsError, match="cannot run"),
        cache.lock(),
        cache.staging("kernel", "k3") as stage,
    ):
        stage.log.run(["/nonexistent/make"])
