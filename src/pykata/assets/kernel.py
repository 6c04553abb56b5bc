"""The guest kernel: Debian's linux-source tree built with pykata's config fragment.

Steps: extract the tarball and apply pykata's patches (`kernel/patches/*.patch`,
in name order), `make tinyconfig`, merge `kernel/pykata.config` on top, `make olddefconfig`,
check that every option of the fragment survived (Kconfig silently drops an
option whose dependencies are unmet), then `make bzImage`. Both images are kept:
`vmlinux` (stripped, booted through its PVH entry note without decompression)
and `bzImage`. The tree is built out of place (`make O=`), so one extracted
source tree serves every build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.assets import host
from pykata.assets.buildlog import BuildLog, Progress, StepFailed, no_progress
from pykata.assets.cache import AssetCache, Installed
from pykata.assets.elfnote import has_pvh_note

KIND = "kernel"
# Bump when a change to this module changes what a build produces.
BUILDER_VERSION = "2"
FRAGMENT = Path(__file__).resolve().parent / "kernel" / "pykata.config"
PATCHES = Path(__file__).resolve().parent / "kernel" / "patches"
DEFAULT_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
VMLINUX = "vmlinux"
BZIMAGE = "bzImage"

# Environment of every make: fixed build user, host and timestamp make the
# kernel's version banner (and so the image) independent of who built it when.
_BUILD_ENV = {
    "KBUILD_BUILD_USER": "pykata",
    "KBUILD_BUILD_HOST": "pykata",
    "LC_ALL": "C",
}


@dataclass(frozen=True)
class KernelSpec:
    """Everything a kernel build depends on."""

    fragment: Path = FRAGMENT
    tarball: Path = DEFAULT_TARBALL
    arch: str = "x86_64"
    make_vars: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    patches: tuple[Path, ...] = field(
        default_factory=lambda: tuple(sorted(PATCHES.glob("*.patch"))))

    def make_args(self) -> list[str]:
        return [f"ARCH={self.arch}", *(f"{k}={v}" for k, v in self.make_vars)]

    def fragment_options(self) -> list[str]:
        """The fragment's option lines, each of which must appear verbatim in .config."""
        lines = (line.strip() for line in self.fragment.read_text().splitlines())
        return [line for line in lines if line and not line.startswith("#")]

    def key(self) -> str:
        """Hash of the inputs; cheap (one stat, one small read) so `locate` can call it."""
        st = _stat_tarball(self)
        inputs = {
            "builder": BUILDER_VERSION,
            "fragment": hashlib.sha256(self.fragment.read_bytes()).hexdigest(),
            "patches": self.patch_digests(),
            "tarball": [str(self.tarball), st.st_size, st.st_mtime_ns],
            "make": self.make_args(),
            "env": _BUILD_ENV,
        }
        return _digest(inputs)

    def patch_digests(self) -> list[list[str]]:
        return [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in self.patches]

    def package(self) -> str:
        """The Debian package providing the tarball: linux-source-6.1.tar.xz → linux-source-6.1."""
        return self.tarball.name.split(".tar")[0]


@dataclass(frozen=True)
class KernelArtifact:
    key: str
    path: Path
    vmlinux: Path
    bzimage: Path
    release: str
    manifest: dict[str, Any]

    @classmethod
    def from_installed(cls, found: Installed) -> KernelArtifact:
        return cls(
            key=found.key,
            path=found.path,
            vmlinux=found.path / VMLINUX,
            bzimage=found.path / BZIMAGE,
            release=str(found.manifest.get("kernel_release", "")),
            manifest=found.manifest,
        )


def find_kernel(spec: KernelSpec, cache: AssetCache) -> KernelArtifact | None:
    found = cache.find(KIND, spec.key())
    return None if found is None else KernelArtifact.from_installed(found)


def build_kernel(
    spec: KernelSpec | None = None,
    cache: AssetCache | None = None,
    *,
    force: bool = False,
    progress: Progress = no_progress,
    jobs: int | None = None,
) -> KernelArtifact:
    """Build the kernel unless the cache already holds one with the same key."""
    spec = spec or KernelSpec()
    cache = cache or AssetCache.default()
    check_host(spec)
    key = spec.key()
    with cache.lock(progress):
        # Checked under the lock: a concurrent build may just have finished it.
        if not force and (done := find_kernel(spec, cache)) is not None:
            progress(f"kernel up to date (key {key}, {done.release})")
            return done
        with cache.staging(KIND, key, progress) as stage:
            log = stage.log
            log.step(f"kernel: building key {key} from {spec.tarball.name} + {spec.fragment.name}")
            src = source_tree(spec, cache, log)
            obj = stage.work / "obj"
            configure(spec, src, obj, log)
            n = jobs or os.cpu_count() or 1
            log.step(f"kernel: compiling (make -j{n} bzImage, several minutes)")
            log.run(_make(spec, src, obj, f"-j{n}", "bzImage"), env=_BUILD_ENV)
            release = kernel_release(spec, src, obj, log)
            sizes = install_images(obj, stage.path, log)
            manifest = {"kernel_release": release, "inputs": _inputs(spec), "sizes": sizes}
            path = stage.commit(manifest)
        cache.prune(KIND)
    progress(f"kernel built: {path} ({release})")
    found = cache.find(KIND, key)
    assert found is not None
    return KernelArtifact.from_installed(found)


def check_host(spec: KernelSpec) -> None:
    host.require(
        [
            host.tool("make", "make"),
            host.tool("gcc", "gcc"),
            host.tool("flex", "flex"),
            host.tool("bison", "bison"),
            host.tool("bc", "bc"),
            host.tool("tar", "tar"),
            host.tool("xz", "xz-utils"),
            host.tool("objcopy", "binutils"),
            host.tool("patch", "patch"),
            # objtool, which x86_64 builds always run, needs libelf's headers.
            host.file("/usr/include/libelf.h", "libelf-dev"),
            host.file(spec.tarball, spec.package()),
        ],
        "guest kernel",
    )


def source_tree(spec: KernelSpec, cache: AssetCache, log: BuildLog) -> Path:
    """The extracted tarball with pykata's patches applied, made once per tarball
    identity and set of patches and then reused."""
    st = _stat_tarball(spec)
    identity: list[object] = [str(spec.tarball), st.st_size, st.st_mtime_ns]
    # Each patch read once: the bytes named in the tree's identity are the
    # bytes applied, even if the file changes while the tree is made.
    patches = [(p.name, p.read_text()) for p in spec.patches]
    if patches:
        identity.append([[name, hashlib.sha256(text.encode()).hexdigest()]
                         for name, text in patches])
    tree = cache.source_dir / f"linux-{_digest(identity)}"
    if tree.is_dir():
        return tree
    cache.source_dir.mkdir(parents=True, exist_ok=True)
    # The source dir may be shared by several caches: its own lock.
    with _flocked(cache.source_dir / "lock"):
        if tree.is_dir():
            return tree
        for leftover in cache.source_dir.glob(".extract-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        log.step(f"kernel: extracting {spec.tarball} (once per tarball, about a minute)")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache.source_dir))
        try:
            log.run(["tar", "-xf", spec.tarball, "-C", tmp])
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
                raise StepFailed(f"{spec.tarball} does not hold a single kernel source tree")
            for name, text in patches:
                log.step(f"kernel: applying {name}")
                # --fuzz=0: a patch that no longer fits its context exactly
                # fails the build instead of landing somewhere else.
                log.run(["patch", "-p1", "--batch", "--forward", "--fuzz=0",
                         "--no-backup-if-mismatch", "-d", tops[0]], input_text=text)
            os.replace(tops[0], tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tree


def configure(spec: KernelSpec, src: Path, obj: Path, log: BuildLog) -> None:
    """Write obj/.config: tinyconfig + the fragment, then check every option stuck."""
    obj.mkdir(parents=True, exist_ok=True)
    log.step(f"kernel: configuring (tinyconfig + {spec.fragment.name})")
    log.run(_make(spec, src, obj, "tinyconfig"), env=_BUILD_ENV)
    log.run(
        [src / "scripts/kconfig/merge_config.sh", "-m", "-O", obj, obj / ".config", spec.fragment],
        cwd=obj,
        env=_BUILD_ENV,
    )
    log.run(_make(spec, src, obj, "olddefconfig"), env=_BUILD_ENV)
    have = set((obj / ".config").read_text().splitlines())
    lost = [line for line in spec.fragment_options() if line not in have]
    if lost:
        log.write("options of the fragment missing from .config:\n" + "\n".join(lost))
        raise StepFailed(
            f"options in {spec.fragment.name} did not stick after olddefconfig "
            f"(a typo, or a dependency that is not enabled): {', '.join(lost)}"
        )


def kernel_release(spec: KernelSpec, src: Path, obj: Path, log: BuildLog) -> str:
    """`make kernelrelease`: what `uname -r` says in the guest, e.g. 6.1.192-pykata."""
    out = log.output(
        _make(spec, src, obj, "-s", "--no-print-directory", "kernelrelease"), env=_BUILD_ENV
    )
    return out.strip().splitlines()[-1]


def install_images(obj: Path, out: Path, log: BuildLog) -> dict[str, int]:
    """Copy bzImage, a stripped vmlinux and the .config into the artifact directory."""
    log.step("kernel: installing vmlinux (stripped) and bzImage")
    log.run(["objcopy", "--strip-all", obj / "vmlinux", out / VMLINUX])
    if not has_pvh_note(out / VMLINUX):
        raise StepFailed(f"{out / VMLINUX} has no PVH entry note: QEMU could not boot it")
    shutil.copyfile(obj / "arch/x86/boot/bzImage", out / BZIMAGE)
    shutil.copyfile(obj / ".config", out / "config")
    return {name: (out / name).stat().st_size for name in (VMLINUX, BZIMAGE)}


def _inputs(spec: KernelSpec) -> dict[str, object]:
    st = spec.tarball.stat()
    return {
        "builder": BUILDER_VERSION,
        "fragment": str(spec.fragment),
        "fragment_sha256": hashlib.sha256(spec.fragment.read_bytes()).hexdigest(),
        "patches": spec.patch_digests(),
        "tarball": str(spec.tarball),
        "tarball_size": st.st_size,
        "tarball_mtime_ns": st.st_mtime_ns,
        "make": spec.make_args(),
    }


def _make(spec: KernelSpec, src: Path, obj: Path, *targets: str) -> list[str]:
    return ["make", "-C", str(src), f"O={obj}", *spec.make_args(), *targets]


def _stat_tarball(spec: KernelSpec) -> os.stat_result:
    host.require([host.file(spec.tarball, spec.package())], "guest kernel")
    return spec.tarball.stat()


def _digest(inputs: object) -> str:
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
