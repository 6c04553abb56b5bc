"""Where a sandbox's files live on the host and in the guest (see DESIGN.md)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import PykataError

GUEST_SHARED_DIR = "/run/pykata/shared"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_RESERVED = {"shared"}


def run_root() -> Path:
    """The root of pykata's runtime state (tests may move it with PYKATA_RUN_ROOT)."""
    return Path(os.environ.get("PYKATA_RUN_ROOT", "/run/pykata"))


def check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value) or value in _RESERVED:
        raise PykataError(
            f"invalid {kind} {value!r}",
            hint="use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


@dataclass(frozen=True)
class SandboxPaths:
    sandbox_id: str
    root: Path

    @classmethod
    def for_sandbox(cls, sandbox_id: str) -> SandboxPaths:
        return cls(check_id("sandbox id", sandbox_id), run_root())

    @property
    def run_dir(self) -> Path:
        """QMP and agent state, console log, state file."""
        return self.root / self.sandbox_id

    @property
    def shared_dir(self) -> Path:
        """Exported to the guest as its /run/pykata/shared."""
        return self.root / "shared" / self.sandbox_id

    def container_rootfs(self, container_id: str) -> Path:
        return self.shared_dir / "containers" / container_id / "rootfs"

    @staticmethod
    def guest_rootfs(container_id: str) -> str:
        return f"{GUEST_SHARED_DIR}/containers/{container_id}/rootfs"

    def container_volumes(self, container_id: str) -> Path:
        """Where the host paths a container binds in are mounted for the guest."""
        return self.shared_dir / "containers" / container_id / "volumes"

    @staticmethod
    def guest_volumes(container_id: str) -> str:
        return f"{GUEST_SHARED_DIR}/containers/{container_id}/volumes"

    def scratch_dir(self, container_id: str) -> Path:
        """Host-only space of one container (overlay upper/work dirs, FIFOs)."""
        return self.run_dir / "containers" / container_id
