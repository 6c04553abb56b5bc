"""What goes into the initrd, and the key that names it.

The plan lists every entry of the archive with where it comes from and a
fingerprint: a content hash for pykata's and protobuf's files (they change
during development without their size changing), size and mtime for binaries,
libraries and the stdlib (they change only when a Debian package is upgraded,
and stat is cheap). The key hashes the plan, so computing it costs a few stats
and reads, not a build; the module scan behind it is cached (see pyscan).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pykata.assets import host, pyscan
from pykata.assets.cache import AssetCache, write_json
from pykata.errors import AssetsError

KIND = "initrd"
# Bump when a change to the builder changes what a build produces.
BUILDER_VERSION = "6"  # 4: the root image next to the initrd; 5: its ctimes zero; 6: 2 MiB padded

SRC_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the pykata package
DEFAULT_INIT = Path(__file__).resolve().parent / "initrd" / "init"
SUBREAPER_SOURCE = Path(__file__).resolve().parent / "initrd" / "subreaper.c"
SUBREAPER = "/usr/libexec/pykata/subreaper"
CC = Path("/usr/bin/gcc")
DEFAULT_ENTRY = "pykata.agent.__main__"
GUEST_LIB = "/usr/lib/pykata"  # PYTHONPATH of the agent, set by /init


class Compression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"


@dataclass(frozen=True)
class InitrdSpec:
    """Everything an initrd build depends on; the defaults build the real guest."""

    init_script: Path = DEFAULT_INIT
    entry_module: str = DEFAULT_ENTRY
    source_roots: tuple[Path, ...] = (SRC_ROOT,)
    site_packages: Path | None = None  # where google.protobuf lives; default: as imported here
    python: Path = Path("/usr/bin/python3.11")
    busybox: Path = Path("/bin/busybox")
    crun: Path = Path("/usr/bin/crun")
    # Uncompressed: under emulation the kernel's gunzip costs more boot time
    # than reading a bigger initrd from host memory saves.
    compression: Compression = Compression.NONE

    @property
    def google_dir(self) -> Path:
        return (self.site_packages or _protobuf_site_packages()) / "google"

    @property
    def shipped_packages(self) -> frozenset[str]:
        """Top-level packages taken from the source roots."""
        return frozenset({"pykata", self.entry_module.split(".")[0]})


class EntryKind(enum.StrEnum):
    DIR = "dir"
    FILE = "file"  # copied from `source`
    PYC = "pyc"  # `source` compiled to sourceless bytecode
    DATA = "data"  # `data`
    SYMLINK = "symlink"
    CHARDEV = "chardev"
    C_PROGRAM = "c-program"  # `source` (C) compiled and linked statically


@dataclass(frozen=True)
class PlannedEntry:
    path: str  # absolute path in the guest
    kind: EntryKind
    mode: int = 0o644
    source: Path | None = None
    fingerprint: str = ""
    data: bytes = field(default=b"", repr=False)  # DATA content, or SYMLINK target
    rdev: tuple[int, int] = (0, 0)

    def describe(self) -> list[object]:
        return [self.path, self.kind.value, self.mode, self.fingerprint, list(self.rdev)]


@dataclass(frozen=True)
class InitrdPlan:
    spec: InitrdSpec
    key: str
    entries: tuple[PlannedEntry, ...]
    scan: pyscan.ScanResult
    protobuf_version: str


_DIRS = {
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "run": 0o755,
    "tmp": 0o1777,
    "mnt": 0o755,
    "root": 0o700,
    "etc": 0o755,
    "var/tmp": 0o1777,
    "usr/sbin": 0o755,
    "sbin": 0o755,
}
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
_GROUP = b"root:x:0:\n"
_HOSTNAME = b"pykata\n"


def requirements(spec: InitrdSpec) -> list[host.Requirement]:
    return [
        host.file(spec.python, spec.python.name),
        host.file(spec.busybox, "busybox-static"),
        host.file(spec.crun, "crun"),
        host.tool("ldd", "libc-bin"),
        host.file(CC, "gcc"),
        host.file("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
    ]


def make_plan(spec: InitrdSpec, cache: AssetCache) -> InitrdPlan:
    """List the initrd's entries and compute its key (cheap once the scan is cached)."""
    host.require(requirements(spec), "guest initrd")
    google = spec.google_dir
    agent_digests = _content_digests(_agent_sources(spec))
    google_digests = _content_digests(_google_files(google))
    request = pyscan.ScanRequest(
        python=spec.python,
        entry_module=spec.entry_module,
        source_roots=spec.source_roots,
        google_dir=google,
        extra_modules=tuple(_module_names(google.parent, google / "protobuf")),
    )
    sources_digest = _digest([sorted(agent_digests.items()), sorted(google_digests.items())])
    scan = pyscan.cached_scan(request, sources_digest, cache.plan_dir)
    unshippable = [str(p) for p in scan.agent_files if p not in agent_digests]
    if unshippable:
        raise AssetsError(
            f"the agent imports modules outside the packages pykata ships "
            f"({', '.join(sorted(spec.shipped_packages))}): {', '.join(unshippable)}"
        )
    facts = _cached_host_facts(spec, scan, google, cache)
    by_path: dict[str, PlannedEntry] = {}
    # Busybox applet links first: a real file at the same path (an applet
    # named like a binary the initrd ships) replaces the link.
    for entry in (
        *_applet_links(facts["applets"]),
        *_base_entries(spec),
        *_binary_entries(spec, facts["libraries"]),
        *_python_entries(spec, scan, google, agent_digests, google_digests),
    ):
        by_path[entry.path] = entry
    entries = tuple(by_path[p] for p in sorted(by_path))
    key = _digest([BUILDER_VERSION, spec.compression.value, [e.describe() for e in entries]])
    return InitrdPlan(spec, key, entries, scan, _protobuf_version(google))


def _base_entries(spec: InitrdSpec) -> Iterator[PlannedEntry]:
    for path, mode in _DIRS.items():
        yield PlannedEntry("/" + path, EntryKind.DIR, mode)
    # The kernel opens /dev/console for init's stdio before /init can mount
    # devtmpfs, so these two nodes must be in the archive itself.
    yield PlannedEntry("/dev/console", EntryKind.CHARDEV, 0o600, rdev=(5, 1))
    yield PlannedEntry("/dev/null", EntryKind.CHARDEV, 0o666, rdev=(1, 3))
    for path, data in (
        ("/etc/passwd", _PASSWD),
        ("/etc/group", _GROUP),
        ("/etc/hostname", _HOSTNAME),
    ):
        yield _data(path, data, 0o644)
    yield _data("/init", spec.init_script.read_bytes(), 0o755)


def _applet_links(applets: list[str]) -> Iterator[PlannedEntry]:
    for applet in applets:
        yield PlannedEntry(
            "/" + applet, EntryKind.SYMLINK, 0o777, data=b"/bin/busybox", fingerprint="/bin/busybox"
        )


def _binary_entries(spec: InitrdSpec, libraries: list[str]) -> Iterator[PlannedEntry]:
    yield _file("/bin/busybox", spec.busybox)
    yield _file("/usr/bin/python3.11", spec.python)
    yield PlannedEntry(
        "/usr/bin/python3", EntryKind.SYMLINK, 0o777, data=b"python3.11", fingerprint="python3.11"
    )
    yield _file("/usr/bin/crun", spec.crun)
    digest = hashlib.sha256(SUBREAPER_SOURCE.read_bytes()).hexdigest()
    yield PlannedEntry(SUBREAPER, EntryKind.C_PROGRAM, 0o755, SUBREAPER_SOURCE,
                       f"{digest}:{_identity(CC)}")
    for lib in libraries:
        yield _file(lib, Path(lib))


def _python_entries(
    spec: InitrdSpec,
    scan: pyscan.ScanResult,
    google: Path,
    agent_digests: dict[Path, str],
    google_digests: dict[Path, str],
) -> Iterator[PlannedEntry]:
    # The stdlib keeps its host path: the interpreter finds its prefix by
    # looking for lib/python3.11/os.py[c] next to its binary's parent, and
    # lib-dynload must exist for the platform-dependent half.
    yield PlannedEntry(str(scan.dynload_dir), EntryKind.DIR, 0o755)
    for src in scan.stdlib_sources:
        yield _pyc(str(src.with_suffix(".pyc")), src, _identity(src))
    for so in scan.extensions:
        yield _file(str(so), so)
    for src in scan.agent_files:
        root = next(r for r in spec.source_roots if src.is_relative_to(r))
        rel = src.relative_to(root).with_suffix(".pyc")
        yield _pyc(f"{GUEST_LIB}/{rel}", src, agent_digests[src])
    for path, digest in google_digests.items():
        rel = path.relative_to(google.parent)
        if path.suffix == ".py":
            yield _pyc(f"{GUEST_LIB}/{rel.with_suffix('.pyc')}", path, digest)
        else:
            yield PlannedEntry(f"{GUEST_LIB}/{rel}", EntryKind.FILE, 0o755, path, digest)


def _cached_host_facts(
    spec: InitrdSpec, scan: pyscan.ScanResult, google: Path, cache: AssetCache
) -> dict[str, list[str]]:
    """Shared libraries (ldd) and busybox applets: a dozen processes, so cached."""
    binaries = [
        spec.python,
        spec.crun,
        spec.busybox,
        *scan.extensions,
        *sorted(google.glob("**/*.so")),
    ]
    key = _digest([str(b) + ":" + _identity(b) for b in binaries])
    path = cache.plan_dir / f"host-{key}.json"
    try:
        with open(path, encoding="utf-8") as f:
            facts: dict[str, list[str]] = json.load(f)
        if all(os.path.exists(lib) for lib in facts["libraries"]):
            return facts
    except (OSError, ValueError, KeyError):
        pass
    libraries: set[str] = set()
    for binary in binaries:
        libraries.update(str(lib) for lib in host.shared_libraries(binary))
    facts = {"libraries": sorted(libraries), "applets": _busybox_applets(spec.busybox)}
    with contextlib.suppress(OSError):  # a read-only cache still works, only slower
        write_json(path, facts)
    return facts


def _busybox_applets(busybox: Path) -> list[str]:
    proc = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise AssetsError(f"`{busybox} --list-full` failed: {proc.stderr.strip()}")
    return sorted(proc.stdout.split())


def _agent_sources(spec: InitrdSpec) -> Iterator[Path]:
    for root in spec.source_roots:
        for package in sorted(spec.shipped_packages):
            top = root / package
            if top.is_dir():
                yield from _walk(top, (".py",))
            elif (single := root / f"{package}.py").is_file():
                yield single


def _google_files(google: Path) -> Iterator[Path]:
    for sub in ("protobuf", "_upb"):
        yield from _walk(google / sub, (".py", ".so"))


def _walk(top: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield Path(dirpath, name)


def _module_names(root: Path, package: Path) -> Iterator[str]:
    for path in _walk(package, (".py",)):
        parts = path.relative_to(root).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _content_digests(paths: Iterator[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _file(guest: str, source: Path) -> PlannedEntry:
    mode = 0o755 if source.stat().st_mode & 0o111 else 0o644
    return PlannedEntry(guest, EntryKind.FILE, mode, source, _identity(source))


def _pyc(guest: str, source: Path, fingerprint: str) -> PlannedEntry:
    return PlannedEntry(guest, EntryKind.PYC, 0o644, source, fingerprint)


def _data(guest: str, data: bytes, mode: int) -> PlannedEntry:
    return PlannedEntry(
        guest, EntryKind.DATA, mode, None, hashlib.sha256(data).hexdigest(), data=data
    )


def _digest(data: object) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _protobuf_site_packages() -> Path:
    """The site-packages holding the protobuf that pykata itself runs with.

    Found without importing protobuf (find_spec only imports the namespace
    package `google`), because the runtime calls this on every VM start.
    """
    import importlib.util

    spec = importlib.util.find_spec("google.protobuf")
    if spec is None or spec.origin is None:
        raise AssetsError(
            "the protobuf package is not installed in pykata's Python environment",
            hint="install pykata with its dependencies (pip install pykata)",
        )
    return Path(spec.origin).resolve().parents[2]


def _protobuf_version(google: Path) -> str:
    text = (google / "protobuf" / "__init__.py").read_text()
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else "unknown"
