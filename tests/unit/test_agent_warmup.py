"""The agent's boot imports: what it defers, and the warm-up that imports it later."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pykata.agent import boot_profile, warmup
from pykata.agent.containers import DEFERRED_MODULES, Containers
from pykata.agent.reaper import Reaper
from pykata.factory import template
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import boot_steps
from pykata.ttrpc import Code, StatusError

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after `code` (json less: the probe's own)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": str(SRC)},
    )
    return set(json.loads(out.stdout.splitlines()[-1])) - {"json", "json.decoder", "json.scanner",
                                                          "json.encoder"}


def test_the_agents_boot_imports_leave_out_what_only_containers_need() -> None:
    loaded = _modules_after("import pykata.agent.main")
    assert "pykata.agent.containers" in loaded and "pykata.ttrpc" in loaded
    deferred = set(DEFERRED_MODULES) - {"json"}  # json: the probe's own
    assert not deferred & loaded, f"imported at boot again: {sorted(deferred & loaded)}"
    for unused in ("pykata.agent.debug_console", "pykata.agent.network"):
        assert unused not in loaded


def test_every_deferred_module_exists_and_imports() -> None:
    # warm_up takes names: a misspelt one would only be logged in the guest.
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n"
                                          for m in DEFERRED_MODULES)
    assert set(DEFERRED_MODULES) - {"json"} <= _modules_after(code)


def test_when_calls_back_once_at_the_mark_or_at_once_if_marked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {})
    monkeypatch.setattr(boot_profile, "_waiting", {})
    calls: list[str] = []
    boot_profile.when("first_request", lambda: calls.append("early"))
    assert calls == []
    boot_profile.mark("first_request")
    boot_profile.mark("first_request")
    assert calls == ["early"]
    boot_profile.when("first_request", lambda: calls.append("late"))
    assert calls == ["early", "late"]


def _fake_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        (tmp_path / f"{name}.py").write_text(f"LOADED = {name!r}\n")
    (tmp_path / "lean_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (*names, "lean_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)


async def test_warm_up_waits_for_the_first_answer_then_imports_past_a_broken_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {})
    monkeypatch.setattr(boot_profile, "_waiting", {})
    _fake_modules(tmp_path, monkeypatch, "lean_one", "lean_two")
    task = asyncio.ensure_future(
        warmup.warm_up(("lean_one", "lean_broken", "lean_two"), start_after=30.0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert "lean_one" not in sys.modules and not task.done()
    boot_profile.mark("first_request")
    await asyncio.wait_for(task, 5)
    assert "lean_one" in sys.modules and "lean_two" in sys.modules
    assert "lean_broken" not in sys.modules
    assert "importing lean_broken failed" in caplog.text


async def test_warm_up_yields_to_the_loop_between_modules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {"first_request": 1.0})
    monkeypatch.setattr(boot_profile, "_waiting", {})
    _fake_modules(tmp_path, monkeypatch, "lean_a", "lean_b", "lean_c")
    counts: list[int] = []

    async def request() -> None:
        # Something served meanwhile runs between two imports, not after all.
        for _ in range(12):
            counts.append(sum(m in sys.modules for m in ("lean_a", "lean_b", "lean_c")))
            await asyncio.sleep(0)

    await asyncio.gather(warmup.warm_up(("lean_a", "lean_b", "lean_c")), request())
    assert counts[0] == 0 and counts[-1] == 3
    assert all(later - earlier <= 1 for earlier, later in itertools.pairwise(counts)), counts


async def test_warm_up_starts_anyway_when_no_request_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {})
    monkeypatch.setattr(boot_profile, "_waiting", {})
    _fake_modules(tmp_path, monkeypatch, "lean_late")
    await asyncio.wait_for(warmup.warm_up(("lean_late",), start_after=0.05), 5)
    assert "lean_late" in sys.modules


async def test_containers_make_the_debug_console_at_its_first_use(tmp_path: Path) -> None:
    containers = Containers(Reaper(), tmp_path)
    assert "console" not in containers.__dict__
    await containers.remove_all()  # nothing to close: not made for it
    assert "console" not in containers.__dict__
    console = containers.console
    assert containers.console is console
    # Made at first use, it refuses as before until CreateSandbox enables it.
    with pytest.raises(StatusError) as refused:
        await console.start(agent_pb2.StartDebugConsoleRequest(exec_id="x"))
    assert refused.value.code == Code.PERMISSION_DENIED


class _ProfileAgent:
    """Answers GetBootProfile with `warm_after` profiles before one marked warm."""

    def __init__(self, warm_after: int | None) -> None:
        self.calls = 0
        self._warm_after = warm_after

    async def boot_profile(self) -> dict[str, float]:
        self.calls += 1
        profile = {"first_request": 2.0}
        if self._warm_after is not None and self.calls > self._warm_after:
            profile["agent_warm"] = 2.2
        return profile


async def test_a_template_is_saved_once_its_agent_is_warm() -> None:
    agent = _ProfileAgent(warm_after=3)
    await asyncio.wait_for(template._until_warm(agent, bound=10.0), 5)  # type: ignore[arg-type]
    assert agent.calls == 4


async def test_a_template_agent_that_never_warms_is_saved_after_the_bound() -> None:
    agent = _ProfileAgent(warm_after=None)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(template._until_warm(agent, bound=0.2), 5)  # type: ignore[arg-type]
    assert 0.2 <= asyncio.get_running_loop().time() - started < 3 and agent.calls >= 2


def test_the_warm_mark_is_a_field_of_the_boot_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {})
    monkeypatch.setattr(boot_profile.time, "clock_gettime", lambda _clock: 2.5)  # a guest's
    boot_profile.mark("agent_warm")
    reply = agent_pb2.BootProfile(**boot_profile.marks())
    assert "agent_warm" in boot_steps(reply)
