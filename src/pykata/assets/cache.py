"""The asset cache: where built guest assets live and how a build lands there.

Layout under the cache root (DESIGN.md, "Where things live at run time"):

    <root>/kernel-<key>/        one built kernel: vmlinux, bzImage, config,
    <root>/initrd-<key>/        one built initrd: initrd.img, contents.txt,
                                each with manifest.json and build.log
    <root>/src/linux-<key>/     extracted kernel sources, reused across builds
    <root>/plans/<key>.json     cached module scans of the agent (see initrd_plan)
    <root>/logs/<kind>-<key>.log  the log of a build that failed
    <root>/tmp/                 builds in progress
    <root>/lock                 flock(2)ed while a build runs

A key is a hash of everything the artifact is built from, so a changed input
means a new directory, never an overwritten one. A build happens in tmp/ and is
renamed into place only when complete: readers see a whole artifact or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pykata.assets.buildlog import BuildLog, Progress, StepFailed, no_progress, tail
from pykata.errors import AssetsError

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "PYKATA_CACHE_DIR"
MANIFEST = "manifest.json"
BUILD_LOG = "build.log"


def default_cache_dir() -> Path:
    """$PYKATA_CACHE_DIR, else /var/cache/pykata for root, else the XDG cache dir."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/pykata")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pykata"


@dataclass(frozen=True)
class Installed:
    """A complete artifact directory found in the cache."""

    kind: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def built_at(self) -> str:
        return str(self.manifest.get("built_at", ""))


@dataclass(frozen=True)
class AssetCache:
    """A cache root. `sources` lets several caches share one extracted kernel tree."""

    root: Path
    sources: Path | None = None

    @classmethod
    def default(cls) -> AssetCache:
        return cls(default_cache_dir())

    @property
    def source_dir(self) -> Path:
        return self.sources if self.sources is not None else self.root / "src"

    @property
    def plan_dir(self) -> Path:
        return self.root / "plans"

    def artifact_dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def failed_log(self, kind: str, key: str) -> Path:
        return self.root / "logs" / f"{kind}-{key}.log"

    def find(self, kind: str, key: str) -> Installed | None:
        """The complete artifact of this kind and key, if built."""
        path = self.artifact_dir(kind, key)
        manifest = read_manifest(path)
        return None if manifest is None else Installed(kind, key, path, manifest)

    def installed(self, kind: str) -> list[Installed]:
        """Every complete artifact of a kind, newest first."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.root.glob(f"{kind}-*"):
                manifest = read_manifest(path)
                if manifest is not None:
                    found.append(Installed(kind, path.name[len(kind) + 1 :], path, manifest))
        return sorted(found, key=lambda i: i.built_at, reverse=True)

    @contextlib.contextmanager
    def lock(self, progress: Progress = no_progress) -> Iterator[None]:
        """Hold the cache's build lock: one build at a time per cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"waiting for another build to finish (lock {self.root / 'lock'})")
                fcntl.flock(f, fcntl.LOCK_EX)
            # Holding the lock, any build directory left in tmp/ belongs to a
            # build that died (killed, power loss): reclaim the space.
            shutil.rmtree(self.root / "tmp", ignore_errors=True)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def staging(self, kind: str, key: str, progress: Progress = no_progress) -> Staging:
        """A fresh build directory; call only while holding `lock()`."""
        return Staging(self, kind, key, progress)

    def prune(self, kind: str, keep: int = 2) -> list[Path]:
        """Remove all but the `keep` newest artifacts of a kind.

        The newest is the current one; the one before it is kept so that a VM
        being started from it while a rebuild lands still finds its files.
        """
        removed = []
        for old in self.installed(kind)[keep:]:
            shutil.rmtree(old.path, ignore_errors=True)
            removed.append(old.path)
        return removed


class Staging:
    """A build in progress: a temp directory that becomes the artifact on commit.

    Used as a context manager. Leaving the block without `commit()` (an
    exception) removes the directory and keeps only the build log, moved to
    `<root>/logs/`; a failed step becomes an AssetsError quoting the log's tail.
    """

    def __init__(self, cache: AssetCache, kind: str, key: str, progress: Progress) -> None:
        self.cache = cache
        self.kind = kind
        self.key = key
        tmp = cache.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{kind}-{key}.", dir=tmp))
        self.work = self.path / "work"
        self.work.mkdir()
        self.log = BuildLog(self.path / BUILD_LOG, progress)
        self.started = time.monotonic()
        self.started_at = _now()
        self.log.write(f"pykata {kind} build, key {key}, started {self.started_at}")
        self._committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._committed:
            return
        self.log.write(f"build failed: {exc!r}")
        self.log.close()
        kept = self.cache.failed_log(self.kind, self.key)
        kept.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.replace(self.log.path, kept)
        shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, StepFailed):
            last = "\n".join("  " + line for line in tail(kept).splitlines())
            raise AssetsError(
                f"{self.kind} build failed: {exc}\nlast lines of the build log {kept}:\n{last}"
            ) from exc

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Record the manifest and move the finished artifact into place."""
        seconds = round(time.monotonic() - self.started, 1)
        manifest = {
            "kind": self.kind,
            "key": self.key,
            "started_at": self.started_at,
            "built_at": _now(),
            "build_seconds": seconds,
            **manifest,
        }
        shutil.rmtree(self.work, ignore_errors=True)
        self.log.write(f"build finished in {seconds} s")
        self.log.close()
        write_json(self.path / MANIFEST, manifest)
        # mkdtemp made it private; the finished artifact is readable by all,
        # like any file under /var/cache (QEMU may run as another user).
        os.chmod(self.path, 0o755)
        final = self.cache.artifact_dir(self.kind, self.key)
        trash = None
        if final.exists():
            # A forced rebuild: move the old one aside first, because rename(2)
            # cannot replace a non-empty directory.
            trash = Path(tempfile.mkdtemp(prefix="old.", dir=self.path.parent))
            os.replace(final, trash / final.name)
        os.replace(self.path, final)
        self._committed = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
