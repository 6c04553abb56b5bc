"""What every target shares: one event loop per process, the per-input checks
(hang, leaked tasks, leaked fds, processes spawned), and the notes file the
parent reads.

A `Violation` is a broken promise of the code under test. In ``enforce`` mode it
propagates, so atheris reports a crash and libFuzzer saves the input. In
``report`` mode the first examples of each kind are saved and fuzzing goes on;
after the last input the worker exits with `VIOLATION_EXIT`. Either way the
process exits non-zero.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import importlib.abc
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

# Wall-clock limit of one input inside the harness (the worker sets it below
# libFuzzer's -timeout, so a hang comes with a traceback). Generous: under
# `nice -n 19` beside busy VMs an input may get a few percent of a core.
# Deadlocks do not wait for it: `wait_until` sees them at once.
HANG_SECONDS = 15.0
VIOLATION_EXIT = 3
_EXAMPLES_PER_KIND = 3
_MAX_KINDS = 200
_DUMP_EVERY = 10_000
_SETTLE_ROUNDS = 10_000
T = TypeVar("T")
# When the guard of the input being run fires; its timer is not a reason to wait.
_guard_when: float | None = None


class Violation(AssertionError):
    """The code under test broke a promise; `kind` groups equal ones in reports."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"[{kind}] {detail}")
        self.kind = kind
        self.detail = detail


class SideEffectAttempt(BaseException):
    """Raised by the tripwires: a BaseException, so no `except Exception` in the
    code under test can turn it into an ordinary error answer."""


class _Counted:
    __slots__ = ("count", "example")

    def __init__(self, example: str) -> None:
        self.count = 0
        self.example = example


class Notes:
    """Counts of what was seen, by kind; bounded in size whatever the inputs."""

    def __init__(self, path: Path, artifacts: Path) -> None:
        self._path = path
        self._artifacts = artifacts
        self.inputs = 0
        self.violations: dict[str, _Counted] = {}
        self.violation_inputs: dict[str, list[str]] = collections.defaultdict(list)
        self.observations: dict[str, _Counted] = {}
        self._dirty = False

    def _bump(self, table: dict[str, _Counted], key: str, example: Callable[[], str]) -> None:
        entry = table.get(key)
        if entry is None:
            if len(table) >= _MAX_KINDS:
                key = "(other kinds, not kept)"
                entry = table.get(key)
            if entry is None:
                entry = table[key] = _Counted(example())
                self._dirty = True
        entry.count += 1

    def violation(self, violation: Violation, data: bytes) -> None:
        self._bump(self.violations, violation.kind, lambda: violation.detail[-4000:])
        saved = self.violation_inputs[violation.kind]
        if len(saved) < _EXAMPLES_PER_KIND:
            name = f"violation-{violation.kind}-{hashlib.sha1(data).hexdigest()[:16]}"
            path = self._artifacts / name
            path.write_bytes(data)
            saved.append(str(path))
            self._dirty = True

    def observe(self, key: str, example: Callable[[], str], data: bytes | None = None) -> None:
        """Count `key`; the first time, keep `example()` and the input being run."""

        def first() -> str:
            text = example()
            if data is not None:
                path = self._artifacts / f"observation-{len(self.observations):03d}"
                path.write_bytes(data)
                text += f"\n(input being run: {path})"
            return text

        self._bump(self.observations, key, first)

    def finished_input(self, final: bool) -> None:
        self.inputs += 1
        if final or self._dirty or self.inputs % _DUMP_EVERY == 0:
            self.dump()

    def dump(self) -> None:
        def table(entries: dict[str, _Counted]) -> dict[str, Any]:
            return {k: {"count": v.count, "example": v.example} for k, v in entries.items()}

        data = {
            "inputs": self.inputs,
            "violations": table(self.violations),
            "violation_inputs": dict(self.violation_inputs),
            "observations": table(self.observations),
        }
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._path)
        self._dirty = False


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-4000:]


def where(exc: BaseException) -> str:
    """The innermost frame of `exc` in pykata's code (else the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/pykata/" in f.filename] or frames
    if not ours:
        return "?"
    frame = ours[-1]
    name = frame.filename.split("/src/", 1)[-1]
    return f"{name}:{frame.lineno} in {frame.name}"


class _LogCapture(logging.Handler):
    """Turns the code under test's error logs into notes; nothing is printed.

    The ttRPC server logs "ttrpc server task failed" when something escaped a
    request's task: that is the "never raise out of the server" promise broken.
    """

    def __init__(self, harness: Harness) -> None:
        super().__init__(logging.ERROR)
        self._harness = harness

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "pykata.ttrpc.server" and record.msg == "ttrpc server task failed":
            self._harness.escaped.append(exc or RuntimeError(record.getMessage()))
            return
        # The template, not the message: asyncio formats the task's name into
        # its first argument, and one key per task would be one per input.
        lines = str(record.msg).splitlines() or [""]
        key = f"{record.name}: {lines[0]}"
        if exc is not None:
            key += f" [{type(exc).__name__} at {where(exc)}]"

        def example() -> str:
            text = record.getMessage()
            if exc is not None:
                text += "\n" + _describe(exc)
            return text[-3000:]

        self._harness.notes.observe(key, example, self._harness.current_input)


class Harness:
    """Runs one target's inputs on one event loop, with the per-input checks."""

    def __init__(self, workdir: Path, *, runs: int, mode: str,
                 hang_seconds: float = HANG_SECONDS) -> None:
        self.workdir = workdir
        self.runs = runs
        self.mode = mode
        self.hang_seconds = hang_seconds
        self.artifacts = workdir / "artifacts"
        self.artifacts.mkdir(exist_ok=True)
        self.notes = Notes(workdir / "notes.json", self.artifacts)
        self.escaped: list[BaseException] = []
        self.side_effects: list[str] = []
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._keep_fds: set[int] = set()
        self.armed = False
        self.current_input: bytes | None = None
        self._install_logging()
        self._install_tripwires()
        sys.meta_path.insert(0, _ImportWatch(self))

    # --- set-up -------------------------------------------------------------

    def _install_logging(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_LogCapture(self))
        # Only errors are worth a LogRecord: the targets log a warning for
        # nearly every malformed frame, and formatting those would cost more
        # than the rest of an input.
        root.setLevel(logging.ERROR)

    def _install_tripwires(self) -> None:
        """No input may start a process: a fake, or a missing binary, should
        have stopped it first. Anything that tries is a violation."""

        def tripwire(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                if not self.armed:  # setting up (seeds, imports) may
                    return original(*args, **kwargs)
                self.side_effects.append(f"{name}{tuple(str(a)[:200] for a in args)}")
                raise SideEffectAttempt(f"{name} called during fuzzing")

            return refuse

        for name in ("posix_spawn", "posix_spawnp", "fork", "forkpty", "execv", "execve",
                     "system", "kill", "killpg"):
            if hasattr(os, name):
                setattr(os, name, tripwire(f"os.{name}", getattr(os, name)))
        # Popen is what asyncio's subprocess support runs on.
        popen: Any = subprocess.Popen
        popen._execute_child = tripwire("subprocess.Popen", popen._execute_child)
        # sync(2) of every filesystem on the host is pointless here and slows
        # everyone else's disk; DestroySandbox calls it.
        os.sync = lambda: None

    def keep_fds_open(self) -> None:
        """Fds open now belong to the harness: never counted as leaked."""
        self._keep_fds = set(_open_fds())

    # --- one input -----------------------------------------------------------

    def wrap(self, one_input: Callable[[bytes], Awaitable[None]]) -> Callable[[bytes], None]:
        def test_one_input(data: bytes) -> None:
            final = self.notes.inputs + 1 >= self.runs
            try:
                self._run(one_input, data)
            except Violation as violation:
                self.notes.violation(violation, data)
                if self.mode == "enforce":
                    self.notes.finished_input(final=True)
                    raise
            except SideEffectAttempt:
                self.notes.finished_input(final=True)
                raise
            self.notes.finished_input(final)
            if final and self.notes.violations:
                sys.stderr.write(
                    f"fuzz: {sum(v.count for v in self.notes.violations.values())} "
                    "contract violation(s); see notes.json\n"
                )
                sys.stderr.flush()
                os._exit(VIOLATION_EXIT)

        return test_one_input

    def _run(self, one_input: Callable[[bytes], Awaitable[None]], data: bytes) -> None:
        self.escaped.clear()
        self.side_effects.clear()
        fds_before = _open_fds()
        self.current_input = data
        self.armed = True
        try:
            self.loop.run_until_complete(self._guarded(one_input(data)))
        finally:
            leftover = self._reap_leftover_tasks()
            self.armed = False
        if self.side_effects:
            raise Violation("side-effect", "; ".join(self.side_effects))
        if self.escaped:
            exc = self.escaped[0]
            raise Violation(
                "raised-out-of-server",
                f"an exception escaped a request task: {type(exc).__name__}: {exc} "
                f"at {where(exc)}\n{_describe(exc)}",
            )
        if leftover:
            raise Violation("task-leak", f"tasks still pending after the input: {leftover}")
        self._check_fds(fds_before)

    async def _guarded(self, coro: Awaitable[None]) -> None:
        global _guard_when
        _guard_when = self.loop.time() + self.hang_seconds
        try:
            async with asyncio.timeout_at(_guard_when) as scope:
                await coro
        except TimeoutError:
            if scope.expired():
                raise Violation(
                    "hang", f"the input did not finish in {self.hang_seconds:g} s"
                ) from None
            raise
        finally:
            _guard_when = None

    def _reap_leftover_tasks(self) -> list[str]:
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        if not pending:
            return []
        names = sorted(f"{t.get_name()} {t.get_coro()!r}"[:200] for t in pending)
        for task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            self.loop.run_until_complete(asyncio.wait(pending, timeout=self.hang_seconds))
        return names

    def _check_fds(self, before: set[int]) -> None:
        leaked = _open_fds() - before - self._keep_fds
        if leaked:
            # libFuzzer's own threads open files now and then (its RSS monitor
            # reads /proc); one of those may be open at the moment of listing.
            time.sleep(0.002)
            leaked &= _open_fds()
        if not leaked:
            return
        described = []
        for fd in sorted(leaked):
            try:
                described.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                described.append(f"{fd} -> ?")
            # Closed, so one leak is reported once, not again by every input after.
            with contextlib.suppress(OSError):
                os.close(fd)
        raise Violation("fd-leak", f"fds left open by the input: {described}")


class _ImportWatch(importlib.abc.MetaPathFinder):
    """Notes modules first imported while an input runs.

    The worker runs as nobody by then, and the interpreter's own library may
    be where nobody cannot read (a Python under /root): such an import fails
    in the code under test for reasons of the harness's making. `preload` in
    the worker imports what is known to be needed; anything this sees is a
    candidate for that list.
    """

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if self._harness.armed:
            self._harness.notes.observe(f"imported during an input: {fullname}",
                                        lambda: f"{fullname} (add it to fuzz.worker.PRELOAD)",
                                        self._harness.current_input)
        return None


def _open_fds() -> set[int]:
    # The listing's own fd is in the listing, closed by the time it returns,
    # and likely the number the next leak gets: leave it out, or a leak of
    # one fd per input would always hide behind it.
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


async def settle() -> None:
    """Let every task run until none can make progress without I/O or a timer.

    Everything here is in memory, so "idle" means done, or waiting for the
    peer (the harness), or hung. Reads the loop's ready queue (a CPython
    detail); without it, a fixed number of rounds stands in.
    """
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    if ready is None:
        for _ in range(64):
            await asyncio.sleep(0)
        return
    for _ in range(_SETTLE_ROUNDS):
        await asyncio.sleep(0)
        if not ready:
            return
    raise Violation("busy-loop", f"still busy after {_SETTLE_ROUNDS} event-loop rounds")


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Settle until `condition()` holds; a Violation if it never can.

    When everything is idle and the condition still does not hold, only a
    timer can change anything. No timer at all (but the harness's own guard)
    is a deadlock, reported at once, however slow the machine; otherwise the
    loop sleeps until the next timer, up to the guard's limit.
    """
    loop = asyncio.get_running_loop()
    while True:
        await settle()
        if condition():
            return
        scheduled = getattr(loop, "_scheduled", None)
        if scheduled is None:  # not CPython's loop: poll instead
            await asyncio.sleep(0.001)
            continue
        timers = [h.when() for h in scheduled if not h.cancelled() and h.when() != _guard_when]
        if not timers:
            raise Violation("hang", f"{what}: everything is idle and no timer is pending")
        await asyncio.sleep(max(0.0, min(timers) - loop.time()))


async def bounded(awaitable: Awaitable[T], what: str) -> T:
    """Await `awaitable`, reporting a deadlock in it as `wait_until` does."""
    task = asyncio.ensure_future(awaitable)
    try:
        await wait_until(task.done, what)
    finally:
        if not task.done():
            task.cancel()
    return task.result()


def replace(obj: object, name: str, value: object) -> None:
    """Monkeypatch for the rest of the process (a worker exists only to fuzz)."""
    if not hasattr(obj, name):
        raise AttributeError(f"{obj!r} has no {name}: the code under test changed")
    setattr(obj, name, value)


def drop_root(paths: list[Path]) -> None:
    """Become nobody (65534), after giving it `paths`, when running as root.

    Fuzzed requests name arbitrary host paths; as nobody every mkdir, mount or
    write outside the harness's own temp dirs fails with EACCES or EPERM.
    """
    if os.geteuid() != 0:
        return
    nobody = 65534
    for base in paths:
        os.chown(base, nobody, nobody)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), nobody, nobody)
    os.setgid(nobody)
    os.setgroups([])
    os.setuid(nobody)
    if os.getresuid() != (nobody,) * 3 or os.getresgid() != (nobody,) * 3 or os.getgroups():
        raise RuntimeError("could not drop root privileges")


class Target:
    """What a target module's `make_target(harness)` returns."""

    #: libFuzzer's -max_len: big enough for a few real messages, small enough to stay fast.
    max_len = 8192

    def seeds(self) -> list[bytes]:
        """Valid inputs to start from, so the fuzzer starts deep in the code."""
        raise NotImplementedError

    async def one_input(self, data: bytes) -> None:
        raise NotImplementedError
