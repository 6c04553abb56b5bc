"""Which boot phase stalled, from the console the guest wrote."""

from __future__ import annotations

from pathlib import Path

from pykata.assets import initrd as initrd_mod
from pykata.runtime.boot_phase import (
    AGENT_MARK,
    AGENT_START,
    FIRST_CALL,
    INIT_MARK,
    KERNEL_BOOT,
    stalled_phase,
)


def _console(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "console.log"
    path.write_text(text)
    return path


def test_an_empty_console_is_the_kernel(tmp_path: Path) -> None:
    phase = stalled_phase(_console(tmp_path, ""))
    assert phase.name == KERNEL_BOOT and "never started pykata's init" in phase.why
    assert stalled_phase(tmp_path / "missing.log").name == KERNEL_BOOT


def test_a_panic_is_named(tmp_path: Path) -> None:
    phase = stalled_phase(_console(tmp_path, "[ 0.9] Kernel panic - not syncing: VFS\n"))
    assert phase.name == KERNEL_BOOT and "panicked" in phase.why


def test_init_without_the_agent_is_agent_start(tmp_path: Path) -> None:
    phase = stalled_phase(_console(tmp_path, f"noise\n{INIT_MARK}\n"))
    assert phase.name == AGENT_START


def test_a_serving_agent_is_the_first_call(tmp_path: Path) -> None:
    text = f"{INIT_MARK}\npykata-agent: INFO: {AGENT_MARK} virtio-serial\n"
    phase = stalled_phase(_console(tmp_path, text))
    assert phase.name == FIRST_CALL
    assert str(phase).startswith("stalled in first agent call: ")


def test_the_marks_are_what_init_and_the_agent_print() -> None:
    """The marks must stay in step with the guest's own lines."""
    init = (Path(initrd_mod.__file__).parent / "initrd" / "init").read_text()
    assert f'echo "{INIT_MARK}"' in init
    agent_main = (Path(initrd_mod.__file__).parent.parent / "agent" / "main.py").read_text()
    assert 'log.info("serving on virtio-serial")' in agent_main
    assert AGENT_MARK == "pykata.agent: serving on"
