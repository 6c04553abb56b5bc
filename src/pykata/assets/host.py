"""What the asset builds need from the host: tools, files, and shared-library lists.

A missing tool is reported before anything starts, with the Debian package that
provides it, so a fresh machine fails in one second instead of after a
six-minute kernel build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import AssetsError, HostError

INSTALL_HINT = "run scripts/install-deps (or: apt-get install {packages})"


@dataclass(frozen=True)
class Requirement:
    """A command on $PATH, or a file, and the Debian package that provides it."""

    what: str
    package: str
    is_file: bool = False

    def present(self) -> bool:
        if self.is_file:
            return os.path.exists(self.what)
        return shutil.which(self.what) is not None


def tool(command: str, package: str) -> Requirement:
    return Requirement(command, package)


def file(path: str | Path, package: str) -> Requirement:
    return Requirement(str(path), package, is_file=True)


def require(requirements: Iterable[Requirement], purpose: str) -> None:
    """Raise HostError naming every missing requirement and its package."""
    missing = [r for r in requirements if not r.present()]
    if not missing:
        return
    listed = ", ".join(f"{r.what} (package {r.package})" for r in missing)
    packages = " ".join(sorted({r.package for r in missing}))
    raise HostError(
        f"cannot build the {purpose}: missing {listed}",
        hint=INSTALL_HINT.format(packages=packages),
    )


# "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-fA-F]+\)\s*$")


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, ELF interpreter included, as ldd resolves them.

    Paths are kept as ldd prints them (e.g. /lib/x86_64-linux-gnu/libc.so.6):
    the guest's dynamic loader finds them at those paths without an ld.so.cache.
    A statically linked binary has none.
    """
    proc = subprocess.run(
        ["ldd", os.fspath(binary)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "not a dynamic executable" in text or "statically linked" in text:
            return []
        raise AssetsError(f"ldd {binary} failed: {text.strip()}")
    libraries = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            raise AssetsError(
                f"{binary} needs a shared library the host does not have: {line.strip()}"
            )
        match = _LDD_LINE.match(line)
        if match and match.group(2).startswith("/"):
            libraries.append(Path(match.group(2)))
    return libraries
