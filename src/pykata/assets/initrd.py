"""The guest initrd: busybox, Debian's python3.11, the agent, protobuf and crun.

The same entries are also written as a read-only ext4 image (root_image.py),
the other form a VM can boot its root from.

Python files are shipped as sourceless bytecode (`foo.pyc` where `foo.py` would
be, the layout `compileall -b` writes). The guest never compiles: /init sets
PYTHONDONTWRITEBYTECODE and the root filesystem is thrown away anyway, so
shipping sources would mean compiling every module on every boot, which under
emulation costs seconds. Sourceless also halves the stdlib's size. Tracebacks
keep file names and line numbers (compiled with the guest path as file name);
the matching source is the host's copy of the same file.

The bytecode is compiled by the guest interpreter itself, in hash mode without
checking, so the archive's bytes depend only on the plan (see initrd_plan).
"""

from __future__ import annotations

import gzip
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.assets import host
from pykata.assets.buildlog import BuildLog, Progress, no_progress
from pykata.assets.cache import AssetCache, Installed
from pykata.assets.cpio import Archive
from pykata.assets.initrd_plan import (
    BUILDER_VERSION,
    CC,
    KIND,
    Compression,
    EntryKind,
    InitrdPlan,
    InitrdSpec,
    PlannedEntry,
    make_plan,
    requirements,
)
from pykata.assets.root_image import ROOT_IMAGE, RootImageUnavailable, write_root_image
from pykata.assets.root_image import can_build as can_build_root_image

IMAGE = "initrd.img"
CONTENTS = "contents.txt"

# optimize=2 drops docstrings and asserts, and -X no_debug_ranges the column
# tables: less bytecode to unmarshal on every boot, where Python runs under
# emulation. A sourceless .pyc is loaded whatever the interpreter's -O level.
_COMPILE_SCRIPT = r"""
import json, py_compile, sys
for src, dst, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True, optimize=2,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


@dataclass(frozen=True)
class InitrdArtifact:
    key: str
    path: Path
    image: Path
    manifest: dict[str, Any]

    @classmethod
    def from_installed(cls, found: Installed) -> InitrdArtifact:
        return cls(found.key, found.path, found.path / IMAGE, found.manifest)


def find_initrd(spec: InitrdSpec, cache: AssetCache) -> InitrdArtifact | None:
    found = cache.find(KIND, make_plan(spec, cache).key)
    return None if found is None else InitrdArtifact.from_installed(found)


def build_initrd(
    spec: InitrdSpec | None = None,
    cache: AssetCache | None = None,
    *,
    force: bool = False,
    progress: Progress = no_progress,
) -> InitrdArtifact:
    """Build the initrd unless the cache already holds one with the same key."""
    spec = spec or InitrdSpec()
    cache = cache or AssetCache.default()
    host.require(requirements(spec), "guest initrd")
    with cache.lock(progress):
        plan = make_plan(spec, cache)
        found = cache.find(KIND, plan.key)
        # One built without its root image (by a user who could not make
        # it) is rebuilt by one who can: the image is the default guest root.
        incomplete = (found is not None and not (found.path / ROOT_IMAGE).is_file()
                      and can_build_root_image() is None)
        if found is not None and not force and not incomplete:
            progress(f"initrd up to date (key {plan.key})")
            return InitrdArtifact.from_installed(found)
        with cache.staging(KIND, plan.key, progress) as stage:
            log = stage.log
            log.step(f"initrd: building key {plan.key} ({len(plan.entries)} planned entries)")
            archive = assemble(plan, stage.work, log)
            size = write_image(archive, stage.path / IMAGE, spec.compression, log)
            sizes = {IMAGE: size}
            root_image = "built"
            try:
                sizes[ROOT_IMAGE] = write_root_image(
                    archive, plan.key, stage.work, stage.path / ROOT_IMAGE, log)
            except RootImageUnavailable as exc:
                # The initrd alone still boots every pod (guest_root = "initrd").
                root_image = f"not built: {exc}"
                log.step(f"root image {root_image}")
            (stage.path / CONTENTS).write_text(listing(plan.entries))
            manifest = {
                "inputs": {
                    "builder": BUILDER_VERSION,
                    "init_script": str(spec.init_script),
                    "entry_module": spec.entry_module,
                    "source_roots": [str(r) for r in spec.source_roots],
                    "python": str(spec.python),
                    "python_version": plan.scan.python_version,
                    "protobuf_version": plan.protobuf_version,
                    "crun": str(spec.crun),
                    "busybox": str(spec.busybox),
                    "compression": spec.compression.value,
                },
                "file_count": len(archive),
                "sizes": sizes,
                "root_image": root_image,
            }
            path = stage.commit(manifest)
        cache.prune(KIND)
    progress(f"initrd built: {path / IMAGE} ({size} bytes, {len(archive)} entries)")
    if ROOT_IMAGE in sizes:
        progress(f"root image built: {path / ROOT_IMAGE} ({sizes[ROOT_IMAGE]} bytes)")
    built = cache.find(KIND, plan.key)
    assert built is not None
    return InitrdArtifact.from_installed(built)


def assemble(plan: InitrdPlan, work: Path, log: BuildLog) -> Archive:
    """Compile the Python files and lay every planned entry into an archive."""
    pyc_root = work / "pyc"
    compiled = compile_bytecode(plan, pyc_root, log)
    archive = Archive()
    for entry in plan.entries:
        path = entry.path.lstrip("/")
        if entry.kind is EntryKind.DIR:
            archive.add_dir(path, entry.mode)
        elif entry.kind is EntryKind.FILE:
            assert entry.source is not None
            archive.add_file(path, entry.source, entry.mode)
        elif entry.kind is EntryKind.PYC:
            archive.add_file(path, compiled[entry.path], entry.mode)
        elif entry.kind is EntryKind.DATA:
            archive.add_data(path, entry.data, entry.mode)
        elif entry.kind is EntryKind.SYMLINK:
            archive.add_symlink(path, entry.data.decode())
        elif entry.kind is EntryKind.CHARDEV:
            archive.add_char_device(path, *entry.rdev, mode=entry.mode)
        elif entry.kind is EntryKind.C_PROGRAM:
            archive.add_file(path, compile_c(entry, work / "bin", log), entry.mode)
    return archive


def compile_c(entry: PlannedEntry, out: Path, log: BuildLog) -> Path:
    """A static, stripped binary of the C program `entry.source`."""
    assert entry.source is not None
    out.mkdir(parents=True, exist_ok=True)
    binary = out / Path(entry.path).name
    log.step(f"initrd: compiling {entry.source.name}")
    log.run([CC, "-static", "-Os", "-s", "-Wall", "-Werror", "-o", binary, entry.source])
    return binary


def compile_bytecode(plan: InitrdPlan, out: Path, log: BuildLog) -> dict[str, Path]:
    """Compile every PYC entry with the guest interpreter; returns guest path → .pyc file."""
    jobs = []
    compiled = {}
    for entry in plan.entries:
        if entry.kind is EntryKind.PYC:
            assert entry.source is not None
            dst = out / entry.path.lstrip("/")
            # dfile: the file name tracebacks show, the module's path in the guest.
            jobs.append((str(entry.source), str(dst), str(Path(entry.path).with_suffix(".py"))))
            compiled[entry.path] = dst
    log.step(f"initrd: compiling {len(jobs)} Python modules with {plan.spec.python}")
    compile_cmd: list[str | os.PathLike[str]] = [
        plan.spec.python, "-S", "-I", "-X", "no_debug_ranges", "-c", _COMPILE_SCRIPT,
    ]
    log.run(compile_cmd, input_text=json.dumps(jobs))
    return compiled


def write_image(archive: Archive, path: Path, compression: Compression, log: BuildLog) -> int:
    log.step(f"initrd: writing {len(archive)} entries ({compression.value} compression)")
    if compression is Compression.GZIP:
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            archive.write(gz)
    else:
        with open(path, "wb") as f:
            archive.write(f)
    return path.stat().st_size


def listing(entries: tuple[PlannedEntry, ...]) -> str:
    """A human-readable table of contents, kept next to the image for debugging."""
    lines = []
    for e in entries:
        kind = {
            EntryKind.DIR: stat.S_IFDIR,
            EntryKind.SYMLINK: stat.S_IFLNK,
            EntryKind.CHARDEV: stat.S_IFCHR,
        }.get(e.kind, stat.S_IFREG)
        line = f"{stat.filemode(kind | e.mode)} {e.path}"
        if e.kind is EntryKind.SYMLINK:
            line += f" -> {e.data.decode()}"
        elif e.source is not None:
            line += f"  <- {e.source}"
        lines.append(line)
    return "\n".join(lines) + "\n"
