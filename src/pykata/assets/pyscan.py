"""Which Python modules the guest agent needs, found with `modulefinder`.

The scan runs under the guest's interpreter (Debian's python3.11, not the Python
running pykata) so that the stdlib it reports is the one that will be copied.
modulefinder follows every import statement in every reached module, including
ones inside functions and `try: import x except ImportError`, so it
over-approximates; that is the safe direction. It cannot see imports done by C
code or by `importlib.import_module`, which is why the protobuf package is
shipped whole and scanned as a whole, and `encodings` is always complete.

A scan takes a second or two; its result is cached under a key of everything it
depends on, so locating the assets (on every VM start) does not rescan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.assets.cache import write_json
from pykata.errors import AssetsError

log = logging.getLogger(__name__)

# Bump when the scan script or its output format changes.
SCAN_VERSION = "2"
KEEP_SCANS = 20

# Developer tools no service imports at run time, reached only through
# modulefinder's over-approximation (test harnesses under `if __name__ ==
# "__main__"`, debugger hooks, ...). Excluding them keeps about 100 modules,
# readline and the test C extensions out of the guest.
EXCLUDED_MODULES = (
    "_ctypes_test",
    "_testbuffer",
    "_testcapi",
    "_testinternalcapi",
    "_xxtestfuzz",
    "bdb",
    "distutils",
    "doctest",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pdb",
    "pydoc",
    "pydoc_data",
    "test",
    "tkinter",
    "turtle",
    "turtledemo",
    "unittest",
    "venv",
    # Reached only through optional imports the agent never takes: asyncio
    # and hashlib run without ssl/_hashlib (and skip libssl's 5 MB), and no
    # agent path sends mail, parses XML, speaks HTTP, spawns a
    # multiprocessing pool or decodes CJK text. (ctypes stays: the agent sets
    # a process's I/O priority and scheduling through it.)
    "_bz2",
    "_codecs_cn",
    "_codecs_hk",
    "_codecs_iso2022",
    "_codecs_jp",
    "_codecs_kr",
    "_codecs_tw",
    "_decimal",
    "_hashlib",
    "_lzma",
    "_multibytecodec",
    "_multiprocessing",
    "_posixshmem",
    "_ssl",
    "bz2",
    "decimal",
    "email",
    "ftplib",
    "getpass",
    "gzip",
    "http",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "netrc",
    "ssl",
    "tarfile",
    "urllib.request",
    "urllib.response",
    "xml",
    "xmlrpc",
    "zipfile",
)

# Imported by the interpreter itself rather than by any scanned module:
# `python -m` runs through runpy.
ALWAYS_SCANNED = ("runpy",)

_SCAN_SCRIPT = r"""
import importlib.machinery, json, modulefinder, os, sys


class Finder(modulefinder.ModuleFinder):
    def import_module(self, partname, fqname, parent):
        try:
            return super().import_module(partname, fqname, parent)
        except AttributeError:
            # modulefinder cannot load a PEP 420 namespace package (no
            # __init__.py; its spec has no loader): record it with its path.
            path = parent.__path__ if parent else self.path
            spec = importlib.machinery.PathFinder.find_spec(partname, path)
            if spec is None or not spec.submodule_search_locations:
                raise
            m = self.add_module(fqname)
            m.__path__ = list(spec.submodule_search_locations)
            if parent:
                setattr(parent, partname, m)
            return m


req = json.load(sys.stdin)
stdlib = os.path.dirname(os.path.abspath(modulefinder.__file__))
dynload = next(p for p in sys.path if p.endswith("lib-dynload"))
finder = Finder(path=req["roots"] + [stdlib, dynload], excludes=req["excludes"])
# google/ comes from the host's site-packages, which is not on the scan path
# (nothing else from there may reach the guest): register it up front.
for name, path in req["namespaces"]:
    finder.add_module(name).__path__ = [path]
out = {"python_version": sys.version.split()[0], "stdlib": stdlib, "dynload": dynload}
try:
    finder.import_hook(req["entry"])
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
else:
    enc = os.path.join(stdlib, "encodings")
    extra = list(req["extra"]) + ["encodings." + f[:-3] for f in sorted(os.listdir(enc))
                                  if f.endswith(".py") and f != "__init__.py"]
    for name in extra:
        try:
            finder.import_hook(name)
        except ImportError:
            pass
    out["files"] = sorted({m.__file__ for m in finder.modules.values() if m.__file__})
    out["missing"] = sorted(finder.badmodules)
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class ScanRequest:
    """What to scan: the agent's entry module, where its sources are, and with what."""

    python: Path
    entry_module: str
    source_roots: tuple[Path, ...]
    google_dir: Path
    extra_modules: tuple[str, ...]  # scanned too (e.g. every protobuf module)


@dataclass(frozen=True)
class ScanResult:
    python_version: str
    stdlib_dir: Path
    dynload_dir: Path
    stdlib_sources: tuple[Path, ...]  # .py files under stdlib_dir
    extensions: tuple[Path, ...]  # extension modules under dynload_dir
    agent_files: tuple[Path, ...]  # .py files under one of the source roots

    def to_json(self) -> dict[str, Any]:
        return {
            "python_version": self.python_version,
            "stdlib_dir": str(self.stdlib_dir),
            "dynload_dir": str(self.dynload_dir),
            "stdlib_sources": [str(p) for p in self.stdlib_sources],
            "extensions": [str(p) for p in self.extensions],
            "agent_files": [str(p) for p in self.agent_files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanResult:
        return cls(
            python_version=data["python_version"],
            stdlib_dir=Path(data["stdlib_dir"]),
            dynload_dir=Path(data["dynload_dir"]),
            stdlib_sources=tuple(Path(p) for p in data["stdlib_sources"]),
            extensions=tuple(Path(p) for p in data["extensions"]),
            agent_files=tuple(Path(p) for p in data["agent_files"]),
        )


def scan_key(request: ScanRequest, inputs_digest: str) -> str:
    """Key of a scan: the request plus a digest of every source it could read."""
    st = request.python.stat()
    data = [
        SCAN_VERSION,
        str(request.python),
        st.st_size,
        st.st_mtime_ns,
        request.entry_module,
        [str(r) for r in request.source_roots],
        str(request.google_dir),
        list(request.extra_modules),
        list(EXCLUDED_MODULES),
        inputs_digest,
    ]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def cached_scan(request: ScanRequest, inputs_digest: str, plan_dir: Path) -> ScanResult:
    """The scan result for these inputs, from the cache when possible."""
    path = plan_dir / f"scan-{scan_key(request, inputs_digest)}.json"
    try:
        with open(path, encoding="utf-8") as f:
            result = ScanResult.from_json(json.load(f))
    except (OSError, ValueError, KeyError):
        pass
    else:
        if all(p.exists() for p in (*result.stdlib_sources, *result.extensions)):
            return result
    result = scan(request)
    try:
        write_json(path, result.to_json())
        _forget_old_scans(plan_dir)
    except OSError as exc:  # a read-only cache still works, only slower
        log.warning("cannot cache the agent module scan in %s: %s", path, exc)
    return result


def _forget_old_scans(plan_dir: Path, keep: int = KEEP_SCANS) -> None:
    """Every edit of the agent makes a new scan: keep only the most recent ones."""
    scans = sorted(plan_dir.glob("scan-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in scans[keep:]:
        old.unlink(missing_ok=True)


def scan(request: ScanRequest) -> ScanResult:
    """Run modulefinder under the guest interpreter and sort what it found."""
    log.debug("scanning %s with %s", request.entry_module, request.python)
    namespaces = [("google", str(request.google_dir))]
    payload = {
        "entry": request.entry_module,
        "roots": [str(r) for r in request.source_roots],
        "namespaces": namespaces,
        "extra": list(ALWAYS_SCANNED + request.extra_modules),
        "excludes": list(EXCLUDED_MODULES),
    }
    proc = subprocess.run(
        [str(request.python), "-S", "-I", "-c", _SCAN_SCRIPT],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssetsError(
            f"scanning the agent's imports with {request.python} failed: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    out = json.loads(proc.stdout)
    if "error" in out:
        roots = ", ".join(str(r) for r in request.source_roots)
        raise AssetsError(
            f"cannot scan the agent's entry module {request.entry_module} "
            f"(searched {roots}): {out['error']}",
            hint="the guest agent must be importable from the pykata sources",
        )
    log.debug("modules modulefinder could not find: %s", out["missing"])
    return classify(request, out)


def classify(request: ScanRequest, out: dict[str, Any]) -> ScanResult:
    stdlib, dynload = Path(out["stdlib"]), Path(out["dynload"])
    stdlib_sources, extensions, agent_files, strays = [], [], [], []
    for name in out["files"]:
        path = Path(name)
        if path.is_relative_to(request.google_dir):
            continue  # the protobuf package is shipped whole
        if path.is_relative_to(dynload):
            extensions.append(path)
        elif path.is_relative_to(stdlib) and path.suffix == ".py":
            stdlib_sources.append(path)
        elif any(path.is_relative_to(r) for r in request.source_roots) and path.suffix == ".py":
            agent_files.append(path)
        else:
            strays.append(name)
    if strays:
        raise AssetsError(
            f"the agent imports modules pykata does not know how to ship: {', '.join(strays)}",
            hint="the guest has only the stdlib, protobuf and pykata's own packages",
        )
    return ScanResult(
        python_version=out["python_version"],
        stdlib_dir=stdlib,
        dynload_dir=dynload,
        stdlib_sources=tuple(stdlib_sources),
        extensions=tuple(extensions),
        agent_files=tuple(agent_files),
    )
