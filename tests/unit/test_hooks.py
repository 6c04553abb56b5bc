"""The host's OCI hooks, run for real: small /bin/sh scripts as hooks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from pykata.errors import SpecError
from pykata.runtime.hooks import (
    GUEST_PHASES,
    HookError,
    check_hooks,
    run_hooks,
    spec_hooks,
    strip_host_hooks,
)


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _state(tmp_path: Path) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "id": "web", "status": "created", "pid": 4242,
            "bundle": str(tmp_path), "annotations": {"org.example/key": "value"}}


async def test_the_state_arrives_on_stdin_and_the_bundle_is_the_working_directory(
    tmp_path: Path,
) -> None:
    """Each hook reads the state JSON on its stdin, runs in the bundle, and the
    hooks of a phase run in their order."""
    out = tmp_path / "out"
    hook = _script(tmp_path, "hook", f'cat > {out}.$1; pwd > {out}.cwd.$1\n')
    state = _state(tmp_path)
    await run_hooks([{"path": hook, "args": ["hook", "1"]},
                     {"path": hook, "args": ["hook", "2"]}], state, phase="prestart")
    assert json.loads((tmp_path / "out.1").read_text()) == state
    assert json.loads((tmp_path / "out.2").read_text()) == state
    assert (tmp_path / "out.cwd.1").read_text().strip() == str(tmp_path)


async def test_env_is_exactly_the_hooks(tmp_path: Path) -> None:
    """The hook sees only the variables it lists (a repeated name: the last),
    none of the runtime's."""
    out = tmp_path / "env"
    # Read from /proc: a shell adds PWD and SHLVL to what it passes on.
    hook = _script(tmp_path, "hook", f'tr "\\0" "\\n" < /proc/$$/environ > {out}\n')
    os.environ["PYKATA_TEST_LEAK"] = "leaked"
    try:
        await run_hooks([{"path": hook, "env": ["A=1", "B=x=y", "A=2", "EMPTY="]}],
                        _state(tmp_path), phase="createRuntime")
    finally:
        del os.environ["PYKATA_TEST_LEAK"]
    assert sorted(out.read_text().split()) == ["A=2", "B=x=y", "EMPTY="]


async def test_args_are_argv_and_args0_is_argv0(tmp_path: Path) -> None:
    """argv is args, argv[0] included, while the program run is `path`
    (docker's libnetwork-setkey relies on it: /proc/<dockerd>/exe dispatches
    on its argv[0])."""
    out = tmp_path / "argv"
    await run_hooks([{"path": "/bin/sh",
                      "args": ["libnetwork-setkey", "-c",
                               f'tr "\\0" " " < /proc/$$/cmdline > {out}', "two"]}],
                    _state(tmp_path), phase="prestart")
    words = out.read_text().split()
    assert (words[0], words[1], words[-1]) == ("libnetwork-setkey", "-c", "two")


async def test_without_args_argv_is_the_path(tmp_path: Path) -> None:
    """No args: the hook's argv is [path]."""
    out = tmp_path / "argv"
    hook = _script(tmp_path, "hook", f'echo "$#" > {out}\n')
    await run_hooks([{"path": hook}], _state(tmp_path), phase="poststart")
    assert out.read_text().strip() == "0"


async def test_a_failing_hook_fails_create_and_the_next_does_not_run(tmp_path: Path) -> None:
    """A prestart hook that exits 3 raises HookError with the phase, the path,
    the status and the tail of its stderr; the hook after it never runs."""
    bad = _script(tmp_path, "bad", "echo some output\necho 'cannot set up the network' >&2\n"
                                   "exit 3\n")
    after = tmp_path / "after"
    good = _script(tmp_path, "good", f"touch {after}\n")
    with pytest.raises(HookError) as err:
        await run_hooks([{"path": bad}, {"path": good}], _state(tmp_path), phase="prestart")
    assert err.value.phase == "prestart"
    assert err.value.path == bad
    assert err.value.returncode == 3
    assert err.value.stderr == "cannot set up the network"
    assert str(err.value) == (f"prestart hook {bad} failed (exit status 3): "
                              "cannot set up the network")
    assert not after.exists()


async def test_a_failing_poststop_hook_is_a_warning_and_the_rest_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """poststop (and poststart) failures are logged; the remaining hooks run."""
    bad = _script(tmp_path, "bad", "echo gone >&2; exit 1\n")
    after = tmp_path / "after"
    good = _script(tmp_path, "good", f"touch {after}\n")
    with caplog.at_level(logging.WARNING, logger="pykata.runtime.hooks"):
        await run_hooks([{"path": bad}, {"path": "relative/hook"}, {"path": good}],
                        _state(tmp_path), phase="poststop")
    assert after.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"poststop hook {bad} failed (exit status 1): gone" in m for m in messages)
    assert any("hooks.poststop[1].path must be an absolute path" in m for m in messages)


async def test_a_hook_that_outlives_its_timeout_is_killed(tmp_path: Path) -> None:
    """A hook still running after `timeout` seconds is killed, with whatever it
    started, and fails its phase."""
    pid_file = tmp_path / "child.pid"
    hook = _script(tmp_path, "slow", f"sleep 60 & echo $! > {pid_file}\nwait\n")
    started = time.monotonic()
    with pytest.raises(HookError) as err:
        await run_hooks([{"path": hook, "timeout": 1}], _state(tmp_path), phase="createRuntime")
    assert time.monotonic() - started < 10
    assert "did not finish within its timeout of 1 s" in str(err.value)
    assert err.value.returncode is not None and err.value.returncode < 0
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _alive(child), "the hook's child outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def test_a_hook_that_ignores_its_stdin_is_fine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A state larger than a pipe's buffer, and a hook that never reads it
    (it closes its stdin, then goes on): the hook runs to its end and its
    phase succeeds, the next hook runs too."""
    state = {**_state(tmp_path), "annotations": {"big": "x" * 300_000}}
    ignoring = _script(tmp_path, "ignoring",
                       f"exec 0<&-\nsleep 0.2\necho done > {tmp_path}/ignored\n")
    reading = _script(tmp_path, "reading", f"head -c 13 > {tmp_path}/read\n")
    with caplog.at_level(logging.WARNING, logger="pykata.runtime.hooks"):
        await run_hooks([{"path": ignoring}, {"path": reading}], state, phase="prestart")
    assert (tmp_path / "ignored").exists(), "the hook was not waited for"
    assert (tmp_path / "ignored").read_text() == "done\n"
    assert (tmp_path / "read").read_text() == '{"ociVersion"'
    assert not caplog.records


@pytest.mark.parametrize(("hook", "problem"), [
    ({"path": "hooks/relative"}, "hooks.prestart[0].path must be an absolute path"),
    ({}, "hooks.prestart[0].path must be an absolute path"),
    ({"path": "/bin/true", "args": "true"}, "hooks.prestart[0].args must be a list of strings"),
    ({"path": "/bin/true", "env": ["NOEQUALS"]}, "hooks.prestart[0].env: 'NOEQUALS'"),
    ({"path": "/bin/true", "env": [1]}, "hooks.prestart[0].env must be a list of strings"),
    ({"path": "/bin/true", "timeout": 0}, "hooks.prestart[0].timeout must be a positive"),
    ({"path": "/bin/true", "timeout": 1.5}, "hooks.prestart[0].timeout must be a positive"),
    ({"path": "/bin/true", "timeout": True}, "hooks.prestart[0].timeout must be a positive"),
])
async def test_malformed_hooks_are_refused_by_field(
    tmp_path: Path, hook: dict[str, Any], problem: str,
) -> None:
    """A malformed hook fails its phase with SpecError naming the field; the
    same check runs over a whole spec before anything starts."""
    with pytest.raises(SpecError, match=re.escape(problem)):
        await run_hooks([hook], _state(tmp_path), phase="prestart")
    with pytest.raises(SpecError):
        check_hooks({"hooks": {"prestart": [hook]}})


async def test_a_missing_program_fails_its_phase(tmp_path: Path) -> None:
    """A hook whose path does not exist fails with HookError (no status)."""
    missing = str(tmp_path / "missing")
    with pytest.raises(HookError, match=re.escape(f"prestart hook {missing}: cannot run")) as err:
        await run_hooks([{"path": missing}], _state(tmp_path), phase="prestart")
    assert err.value.returncode is None


async def test_guest_phases_do_not_run_on_the_host(tmp_path: Path) -> None:
    """createContainer and startContainer run in the guest (crun there)."""
    for phase in GUEST_PHASES:
        with pytest.raises(ValueError, match="run in the guest"):
            await run_hooks([{"path": "/bin/true"}], _state(tmp_path), phase=phase)
    with pytest.raises(ValueError, match="unknown hook phase"):
        await run_hooks([], _state(tmp_path), phase="prestop")


def test_spec_hooks_and_the_guests_share() -> None:
    """spec_hooks picks a phase; strip_host_hooks leaves the guest only its
    own hooks, without touching the caller's spec."""
    spec = {"ociVersion": "1.0.2", "hooks": {
        "prestart": [{"path": "/proc/1/exe", "args": ["libnetwork-setkey", "id", "ctl"]}],
        "createRuntime": [{"path": "/usr/bin/cr"}],
        "createContainer": [{"path": "/bin/cc"}],
        "startContainer": [{"path": "/bin/sc"}],
        "poststart": [{"path": "/usr/bin/ps"}],
        "poststop": [{"path": "/usr/bin/pst"}],
    }}
    assert spec_hooks(spec, "prestart")[0]["args"][0] == "libnetwork-setkey"
    assert spec_hooks({}, "poststop") == []
    assert spec_hooks({"hooks": {}}, "poststop") == []
    guest = strip_host_hooks(spec)
    assert guest["hooks"] == {"createContainer": [{"path": "/bin/cc"}],
                              "startContainer": [{"path": "/bin/sc"}]}
    assert len(spec["hooks"]) == 6
    assert "hooks" not in strip_host_hooks({"hooks": {"prestart": [{"path": "/x"}]}})
    with pytest.raises(SpecError, match=r"hooks\.prestart must be a list"):
        spec_hooks({"hooks": {"prestart": {"path": "/x"}}}, "prestart")
