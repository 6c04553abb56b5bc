"""The OCI hooks that run on the host, and the split between host and guest.

Where each hook runs follows the runtime-spec (config.md "POSIX-platform
Hooks", runtime.md "Lifecycle"), with the VM between the runtime and the
container:

- `prestart` (deprecated) and `createRuntime` run in the runtime namespace,
  after the container's environment exists and before it is started; their
  paths name host programs (docker's libnetwork-setkey, /proc/<dockerd>/exe,
  reads the state on stdin and configures the network namespace the VM's
  taps live in). They run on the host, during create.
- `createContainer` and `startContainer` run in the container's namespaces,
  which exist only in the guest: crun runs them there and their paths resolve
  in the guest (see pykata.agent.guest_spec.GUEST_HOOKS).
- `poststart` and `poststop` run in the runtime namespace after start and
  after delete: on the host.

Failures (runtime.md, steps 4-12): a failing prestart, createRuntime or
createContainer hook fails create, and the runtime stops and deletes the
container; a failing startContainer hook fails start; a failing poststart or
poststop hook is only logged as a warning, and the remaining hooks still run.
`run_hooks` applies the last rule itself; the caller stops and deletes the
container when it raises. runtime-spec 1.3.0 makes a failing poststart hook
fail start and stop the container (`fail_poststart`, which the caller sets
for such bundles).

Each hook gets the container's state JSON on stdin, exactly the environment
it lists (none when it lists none) and its `args` as argv (args[0] is argv0;
the program run is always `path`), and is killed after `timeout` seconds.
Its working directory is the bundle, as with runc, which runs from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pykata.errors import PykataError, SpecError
from pykata.runtime.exit_status import describe_returncode

log = logging.getLogger(__name__)

__all__ = [
    "GUEST_PHASES",
    "HOST_PHASES",
    "PHASES",
    "HookError",
    "check_hooks",
    "run_hooks",
    "spec_hooks",
    "strip_host_hooks",
]

#: Every hook phase of the runtime-spec, in the order they run.
PHASES = ("prestart", "createRuntime", "createContainer", "startContainer",
          "poststart", "poststop")
#: Phases pykata runs on the host.
HOST_PHASES = ("prestart", "createRuntime", "poststart", "poststop")
#: Phases crun runs in the guest, in the container's namespaces.
GUEST_PHASES = ("createContainer", "startContainer")
# Phases whose failure is a warning only (runtime.md, steps 9 and 12).
_WARN_ONLY = frozenset(("poststart", "poststop"))
# How much of a hook's stderr (or stdout) an error keeps.
_TAIL_BYTES = 4096
# After a hook exits, how long a child it left holding its stdout or stderr
# may keep them open before the output is given up.
_DRAIN_SECONDS = 1.0


class HookError(PykataError):
    """A hook failed: it could not be started, exited non-zero, was killed or
    ran past its timeout."""

    def __init__(self, message: str, *, phase: str, path: str,
                 returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        #: The hook's phase ("prestart", ...).
        self.phase = phase
        #: The program the hook ran.
        self.path = path
        #: Its subprocess return code (negative: the signal that killed it);
        #: None when it never ran.
        self.returncode = returncode
        #: The last few KiB of what it wrote to stderr (stdout if stderr was empty).
        self.stderr = stderr


@dataclass(frozen=True)
class _Hook:
    path: str
    argv: tuple[str, ...]
    env: dict[str, str]
    timeout: int | None


def spec_hooks(spec: Mapping[str, Any], phase: str) -> list[dict[str, Any]]:
    """The hooks of `phase` in a config.json document ([] when none)."""
    _check_phase(phase)
    hooks = spec.get("hooks")
    if hooks is None:
        return []
    if not isinstance(hooks, Mapping):
        raise SpecError("hooks must be an object")
    entries = hooks.get(phase)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise SpecError(f"hooks.{phase} must be a list")
    return list(entries)


def check_hooks(spec: Mapping[str, Any]) -> None:
    """Check every hook of `spec`, host and guest ones, before anything runs;
    SpecError names the first bad field (`hooks.prestart[0].path`)."""
    for phase in PHASES:
        for index, hook in enumerate(spec_hooks(spec, phase)):
            _parse(hook, f"hooks.{phase}[{index}]")


def strip_host_hooks(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `spec` with only the hooks that run in the guest
    (createContainer, startContainer): what the guest should get. The host's
    hooks name host programs that crun in the guest must never look for."""
    out = copy.deepcopy(dict(spec))
    hooks = out.get("hooks")
    if isinstance(hooks, dict):
        kept = {phase: hooks[phase] for phase in GUEST_PHASES if hooks.get(phase)}
        if kept:
            out["hooks"] = kept
        else:
            del out["hooks"]
    return out


async def run_hooks(hooks: Sequence[Mapping[str, Any]], state: Mapping[str, Any], *,
                    phase: str, fail_poststart: bool = False) -> None:
    """Run `hooks` of `phase` on the host, one after the other, each with
    `state` (the runtime-spec state: ociVersion, id, status, pid, bundle,
    annotations) as JSON on its stdin.

    For prestart and createRuntime the first failure raises HookError (or
    SpecError for a malformed hook) and the hooks after it do not run; for
    poststart and poststop a failure is logged as a warning and the next
    hook runs (poststart's raises too with `fail_poststart`). createContainer
    and startContainer hooks run in the guest, never here (ValueError).
    """
    _check_phase(phase)
    if phase not in HOST_PHASES:
        raise ValueError(f"{phase} hooks run in the guest, not on the host")
    stdin = json.dumps(dict(state)).encode()
    bundle = state.get("bundle")
    cwd = bundle if isinstance(bundle, str) and os.path.isdir(bundle) else None
    for index, entry in enumerate(hooks):
        try:
            hook = _parse(entry, f"hooks.{phase}[{index}]")
            await _run(hook, stdin, phase, cwd)
        except (HookError, SpecError) as exc:
            if phase not in _WARN_ONLY or (fail_poststart and phase == "poststart"):
                raise
            log.warning("%s (the lifecycle goes on)", exc)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown hook phase {phase!r} (one of {', '.join(PHASES)})")


def _parse(entry: Any, where: str) -> _Hook:
    """A hook as config.md defines it, or SpecError naming the field."""
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where} must be an object")
    path = entry.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise SpecError(f"{where}.path must be an absolute path, not {path!r}")
    args = entry.get("args")
    if args is None:
        args = [path]
    elif not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}.args must be a list of strings")
    env_list = entry.get("env", [])
    if not isinstance(env_list, list) or not all(isinstance(e, str) for e in env_list):
        raise SpecError(f"{where}.env must be a list of strings")
    env: dict[str, str] = {}
    for item in env_list:
        name, sep, value = item.partition("=")
        if not sep or not name or "\0" in item:
            raise SpecError(f"{where}.env: {item!r} is not NAME=VALUE")
        env[name] = value  # the last of a repeated name wins, as with runc
    timeout = entry.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise SpecError(f"{where}.timeout must be a positive number of seconds, "
                        f"not {timeout!r}")
    # An empty args list still needs an argv[0]: the path, as with no args.
    return _Hook(path, tuple(args) or (path,), env, timeout)


async def _run(hook: _Hook, stdin: bytes, phase: str, cwd: str | None) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook.argv, executable=hook.path, env=hook.env, cwd=cwd,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a timeout ends what it started too.
            start_new_session=True,
        )
    except OSError as exc:
        raise HookError(f"{phase} hook {hook.path}: cannot run it: {exc.strerror}",
                        phase=phase, path=hook.path, returncode=None, stderr="") from exc
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    feeding = asyncio.ensure_future(_feed(proc.stdin, stdin))
    out = asyncio.ensure_future(_tail(proc.stdout))
    err = asyncio.ensure_future(_tail(proc.stderr))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), hook.timeout)
    except TimeoutError:
        timed_out = True
        _kill_group(proc.pid)
        await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: leave nothing running
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        feeding.cancel()
    done, pending = await asyncio.wait({out, err}, timeout=_DRAIN_SECONDS)
    for task in pending:
        task.cancel()
    await asyncio.gather(feeding, *pending, return_exceptions=True)
    returncode = proc.returncode
    assert returncode is not None
    if returncode == 0 and not timed_out:
        return
    text = (err.result() if err in done else b"") or (out.result() if out in done else b"")
    tail = text.decode("utf-8", "replace").strip()
    what = (f"did not finish within its timeout of {hook.timeout} s" if timed_out
            else f"failed ({describe_returncode(returncode)})")
    message = f"{phase} hook {hook.path} {what}"
    if tail:
        message += f": {tail}"
    raise HookError(message, phase=phase, path=hook.path, returncode=returncode, stderr=tail)


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write the state; a hook that does not read its stdin is no failure."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        pipe.write(data)
        await pipe.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        pipe.close()
        await pipe.wait_closed()


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """Read `stream` to its end, keeping only its last `_TAIL_BYTES`."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-_TAIL_BYTES:]
    return kept


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
