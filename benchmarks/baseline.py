"""Another pykata beside this one in the same benchmark run: a checkout of
it (with its own `.venv`) whose shim containerd runs as the runtime
`io.containerd.pykatabase.v2`, so both are measured on the same machine in
the same minutes, turn by turn."""

from __future__ import annotations

import os
from pathlib import Path

BASE_RUNTIME = "io.containerd.pykatabase.v2"


class Baseline:
    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout.resolve()
        self.bin = self.checkout / ".venv" / "bin"
        shim = self.bin / "containerd-shim-pykata-v2"
        if not os.access(shim, os.X_OK):
            raise SystemExit(f"no pykata shim at {shim}: run scripts/setup-venv in "
                             f"{self.checkout}")

    def expose(self, tmp: Path) -> None:
        """Put the baseline's shim on the PATH containerd gets, by the name
        containerd looks up for BASE_RUNTIME."""
        bin_dir = tmp / "baseline-bin"
        bin_dir.mkdir()
        (bin_dir / "containerd-shim-pykatabase-v2").symlink_to(
            self.bin / "containerd-shim-pykata-v2")
        os.environ["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '')}"

    def pykata(self) -> str:
        """The baseline's `pykata` command."""
        return str(self.bin / "pykata")
