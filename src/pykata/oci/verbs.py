"""The verbs of `pykata-oci`, as runc's callers expect them to behave.

The pid contract: `create` forks the monitor, whose pid it writes to
--pid-file. The monitor holds the VM, relays the container's stdio (the
descriptors `create` was given, or a pty whose master went to the console
socket), passes the signals it receives to the container's init, and exits
with the init's exit status (128+N for a signal). `exec --pid-file` forks a
relay process that does the same for the exec'd process. Both stay in the
caller's process tree, so containerd's runc shim and conmon, which wait for
that pid as subreapers, see the container's exit as the pid's exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pykata.errors import InvalidStateError, NotFoundError, PykataError, SpecError
from pykata.oci.store import Store, monitor_alive
from pykata.runtime.lifecycle import Lifecycle, Status
from pykata.runtime.state import ContainerState

T = TypeVar("T")
# How long `delete` waits for a monitor to end the VM after Shutdown.
SHUTDOWN_WAIT = 30.0
# Random names tried for the pid file's temporary file before giving up.
PID_TEMP_ATTEMPTS = 8
# In a container's directory: the poststop hooks `create` was given.
POSTSTOP_FILE = "poststop.json"


def dispatch(args: argparse.Namespace, store: Store) -> int:
    verb = args.verb.replace("-", "_")
    handler: Callable[[argparse.Namespace, Store], int] = VERBS[verb]
    return handler(args, store)


def write_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _arun(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio  # not at the top: `state` and `list` never need it

    return asyncio.run(coro)


# --- create / start / run -------------------------------------------------


def _bundle(args: argparse.Namespace) -> Path:
    return Path(args.bundle or os.getcwd()).absolute()


def _prepare(args: argparse.Namespace, store: Store, *, foreground: bool) -> Any:
    """Check the bundle and flags, claim the id: everything before a VM boots."""
    from pykata.oci.launch import Launch
    from pykata.runtime.hooks import spec_hooks
    from pykata.runtime.pod_cgroup import placement_from_spec
    from pykata.runtime.spec import load_bundle

    _refuse_preserved_fds(args)
    bundle = _bundle(args)
    spec, rootfs = load_bundle(bundle)
    terminal = bool(spec["process"].get("terminal"))
    if terminal and not args.console_socket and not (foreground and os.isatty(0)):
        raise SpecError("process.terminal is true but no --console-socket was given",
                        hint="pass --console-socket, or set process.terminal to false")
    if args.console_socket and not terminal:
        raise SpecError("--console-socket was given but process.terminal is false",
                        hint="set process.terminal to true in config.json")
    if not rootfs.is_dir():
        raise SpecError(f"rootfs {rootfs} is not a directory",
                        hint="root.path in config.json must name the container's root")
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise SpecError(f"{bundle / 'config.json'}: annotations must map strings to strings")
    # Before the id is claimed: a bad cgroupsPath leaves nothing behind.
    placement_from_spec(spec, systemd=getattr(args, "systemd_cgroup", False))
    poststop = spec_hooks(spec, "poststop")
    state_dir = store.claim(args.id)
    try:
        _save_poststop(state_dir, poststop)
    except BaseException:
        store.remove(args.id)
        raise
    return Launch(
        id=args.id, bundle=bundle, spec=spec, rootfs=rootfs, state_dir=state_dir,
        config_path=os.environ.get("PYKATA_CONFIG"), debug=args.debug,
        stdio=(0, 1, 2), terminal=terminal, annotations=annotations,
        systemd_cgroup=getattr(args, "systemd_cgroup", False),
    )


def _refuse_preserved_fds(args: argparse.Namespace) -> None:
    if args.preserve_fds > 0:
        raise PykataError(
            f"--preserve-fds {args.preserve_fds}: host descriptors cannot be passed into "
            "a container that runs in a VM",
            hint="drop --preserve-fds (socket activation does not work with pykata)")


def _fork_monitor(launch: Any, console_socket: str) -> int:
    """Fork the monitor and wait until the container is created (or failed)."""
    from pykata.oci.monitor import run_forked

    if launch.terminal and console_socket:
        launch.stdio, launch.pty_master = _console_stdio(console_socket)
    else:
        launch.stdio = tuple(_dup_or_null(fd) for fd in (0, 1, 2))
    return _fork_and_wait(lambda ready_w: run_forked(launch, ready_w),
                          {*launch.stdio, launch.pty_master}, "the monitor")


def _console_stdio(console_socket: str) -> tuple[tuple[int, int, int], int]:
    """A pty whose master went to the console socket: the slave as stdio, and
    a copy of the master (see hostio.wait_read)."""
    from pykata.host import hostio

    master, slave = hostio.open_pty()
    try:
        hostio.send_console(console_socket, master, slave)
    except BaseException:
        os.close(slave)
        os.close(master)
        raise
    return (slave, slave, slave), master


def _fork_and_wait(body: Callable[[int], int], handed_over: set[int], what: str) -> int:
    """Fork a child that runs `body(ready_fd)` and exits with its result;
    wait for its `ReadyReport`. The
    descriptors in `handed_over` are the child's from then on. Returns the
    child's pid; a failure is raised once the child has cleaned up and exited."""
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            code = body(ready_w)
        finally:
            os._exit(code)
    os.close(ready_w)
    for fd in handed_over:
        if fd > 2:
            os.close(fd)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            answer = ready.readline()
    except BaseException:
        # Interrupted while the child starts: it must not go on alone.
        _signal_pid(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    from pykata.runtime.ready import ReadyReport

    report = ReadyReport.decode(answer, what)
    if not report.ok:
        # It tears down before it exits: wait, so nothing is left when we report.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        report.raise_error()
    return pid


def _dup_or_null(fd: int) -> int:
    try:
        return os.dup(fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _write_pid_file(path: str, pid: int) -> None:
    """Write `pid` to `path` atomically. The pid file's directory is the
    caller's (a bundle, conmon's directory): the temporary file is created
    exclusively, never through a link someone planted there, and renamed
    over `path` (a rename replaces a link at `path`, never follows it)."""
    if not path:
        return
    target = Path(path)
    fd, tmp = _create_pid_temp(target)
    try:
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PykataError(f"cannot write the pid file {target}: {exc.strerror}",
                          hint="--pid-file must name a file in a writable directory") from exc


def _create_pid_temp(target: Path) -> tuple[int, Path]:
    """A new file beside `target`, opened for writing: a name nobody can
    have guessed, and a name taken already (by anything, a link included) is
    skipped, never opened."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(PID_TEMP_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, 0o644), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise PykataError(f"cannot write the pid file {target}: {exc.strerror}",
                              hint="--pid-file must name a file in a writable directory"
                              ) from exc
    raise PykataError(f"cannot write the pid file {target}: {PID_TEMP_ATTEMPTS} temporary "
                      f"names beside it were taken",
                      hint=f"remove the stray .{target.name}.* files in {target.parent}")


def create(args: argparse.Namespace, store: Store) -> int:
    launch = _prepare(args, store, foreground=False)
    try:
        pid = _fork_monitor(launch, args.console_socket)
        _write_monitor_pid_file(args.pid_file, pid)
    except BaseException:
        _discard(store, launch)
        raise
    return 0


def _write_monitor_pid_file(path: str, pid: int) -> None:
    """The pid file of a monitor just forked; if it cannot be written, the
    monitor ends first, so that `_discard` never pulls the mounts from under
    a live VM."""
    try:
        _write_pid_file(path, pid)
    except BaseException:
        _signal_pid(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise


def _discard(store: Store, launch: Any) -> None:
    """Undo a create that failed: a monitor that died without its teardown
    (SIGKILL) leaves its VM's mounts and directories."""
    from pykata.oci.monitor import sandbox_key
    from pykata.runtime.paths import SandboxPaths, run_root
    from pykata.runtime.sandbox import cleanup_host_state

    paths = SandboxPaths(sandbox_key(launch.state_dir, launch.id), run_root())
    if paths.run_dir.exists():
        with contextlib.suppress(PykataError):
            cleanup_host_state(paths)
    store.remove(launch.id)


def _require(record: ContainerState, operation: str) -> None:
    """The pod core's rule for `operation` on the container's saved status
    (the monitor checks again, on its live status, before it acts)."""
    Lifecycle("container", record.id, Status(record.status)).require(operation)


def _loaded(store: Store, container_id: str, operation: str) -> ContainerState:
    record = store.load(container_id)
    _require(record, operation)
    return record


def _call(record: ContainerState, method: str, *args: Any) -> Any:
    """`method` of the container's pod client, with `args`, in one connection."""
    from pykata.runtime.control_client import PodClient

    async def call() -> Any:
        async with await PodClient.connect(record.control_socket,
                                           f"container {record.id}") as client:
            return await getattr(client, method)(*args)

    return _arun(call())


def start(args: argparse.Namespace, store: Store) -> int:
    record = _loaded(store, args.id, "start")
    _call(record, "start", record.id)
    return 0


def run(args: argparse.Namespace, store: Store) -> int:
    if args.detach:
        create(args, store)
        try:
            start(args, store)
        except BaseException:
            _force_delete(store, args.id)
            raise
        return 0
    launch = _prepare(args, store, foreground=True)
    from pykata.host.terminal import raw_terminal

    use_tty = launch.terminal and not args.console_socket
    try:
        with raw_terminal(0) if use_tty else contextlib.nullcontext():
            pid = _fork_monitor(launch, args.console_socket)
            _write_monitor_pid_file(args.pid_file, pid)
            forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                         signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
            for sig in forwarded:
                signal.signal(sig, lambda s, _f: _signal_pid(pid, s))
            try:
                start(args, store)
            except BaseException:
                _force_delete(store, args.id)
                raise
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
    except BaseException:
        _discard(store, launch)
        raise
    if not args.keep:
        _delete(store, args.id, force=True)
    return code


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --- state / list -----------------------------------------------------------


def oci_state(record: ContainerState) -> dict[str, Any]:
    alive = record.status != "stopped"
    return {
        "ociVersion": "1.0.2",
        "id": record.id,
        "pid": record.monitor_pid if alive else 0,
        "status": record.status,
        "bundle": record.bundle,
        "rootfs": record.rootfs,
        "created": record.created,
        "annotations": record.annotations,
        "owner": record.owner,
    }


def state(args: argparse.Namespace, store: Store) -> int:
    write_json(oci_state(store.load(args.id)))
    return 0


def list_(args: argparse.Namespace, store: Store) -> int:
    records = []
    for cid in store.ids():
        with contextlib.suppress(PykataError):
            records.append(store.load(cid))
    if args.quiet:
        for record in records:
            print(record.id)
    elif args.format == "json":
        write_json([oci_state(r) for r in records])
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        for r in records:
            s = oci_state(r)
            rows.append((r.id, str(s["pid"]), r.status, r.bundle, r.created, r.owner or "root"))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            print("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


# --- kill / delete ----------------------------------------------------------


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
    else:
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            number = int(signal.Signals[name])
        except KeyError:
            raise PykataError(f"unknown signal {text!r}",
                              hint="use a name (TERM, SIGKILL) or a number") from None
    if not 0 < number < 65:
        raise PykataError(f"invalid signal number {number}")
    return number


def kill(args: argparse.Namespace, store: Store) -> int:
    signum = parse_signal(args.signal)
    record = _loaded(store, args.id, "kill")
    _call(record, "kill", record.id, signum, "", args.all)
    return 0


def delete(args: argparse.Namespace, store: Store) -> int:
    _delete(store, args.id, force=args.force)
    return 0


def _force_delete(store: Store, container_id: str) -> None:
    with contextlib.suppress(PykataError):
        _delete(store, container_id, force=True)


def _delete(store: Store, container_id: str, *, force: bool) -> None:
    try:
        record = store.load(container_id)
    except NotFoundError:
        if force:
            store.remove(container_id)
            return
        raise
    except PykataError:
        # A record this pykata cannot read (an aborted create): with force, go.
        if not force:
            raise
        store.remove(container_id)
        return
    if not force:
        _require(record, "delete")
    if monitor_alive(record):
        with contextlib.suppress(PykataError, OSError):
            _call(record, "shutdown")
        _wait_gone(record, SHUTDOWN_WAIT)
        if monitor_alive(record):
            _signal_pid(record.monitor_pid, signal.SIGKILL)
            _wait_gone(record, 5)
    _leftovers(record)
    _poststop(record, store.dir(container_id))
    store.remove(container_id)


def _wait_gone(record: ContainerState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while monitor_alive(record) and time.monotonic() < deadline:
        time.sleep(0.02)


def _leftovers(record: ContainerState) -> None:
    """What a monitor killed with SIGKILL could not remove: its VM's mounts
    and directories (QEMU died with it)."""
    if not record.sandbox_key or not record.run_root:
        return
    from pykata.runtime.paths import SandboxPaths
    from pykata.runtime.sandbox import cleanup_host_state

    paths = SandboxPaths(record.sandbox_key, Path(record.run_root))
    if paths.run_dir.exists():
        cleanup_host_state(paths)


def _save_poststop(state_dir: Path, hooks: list[dict[str, Any]]) -> None:
    """Keep the poststop hooks `create` was given: `delete` runs these (as
    runc runs the configuration it saved), whatever the bundle holds by then."""
    path = state_dir / POSTSTOP_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(hooks, f)
    except OSError as exc:
        raise PykataError(f"cannot save the poststop hooks in {path}: {exc.strerror}") from exc


def _saved_poststop(state_dir: Path) -> list[dict[str, Any]]:
    """The poststop hooks saved at create ([] when there were none)."""
    path = state_dir / POSTSTOP_FILE
    try:
        hooks = json.loads(path.read_text())
    except FileNotFoundError:
        # Created by a pykata that did not save them: the bundle may have
        # changed since, so it is not read again.
        print(f"pykata-oci: warning: {path} is missing: no poststop hooks run",
              file=sys.stderr)
        return []
    except (OSError, ValueError) as exc:
        print(f"pykata-oci: warning: cannot read {path} ({exc}): no poststop hooks run",
              file=sys.stderr)
        return []
    return hooks if isinstance(hooks, list) else []


def _poststop(record: ContainerState, state_dir: Path) -> None:
    """The poststop hooks saved at create, on the host, after the container
    is gone; their failure is only a warning, as the runtime-spec says."""
    from pykata.runtime.hooks import run_hooks

    hooks = _saved_poststop(state_dir)
    if not hooks:
        return

    state_ = oci_state(record)
    state_["status"] = "stopped"
    state_["pid"] = 0
    try:
        _arun(run_hooks(hooks, state_, phase="poststop"))
    except PykataError as exc:
        print(f"pykata-oci: warning: {exc}", file=sys.stderr)


# --- exec -------------------------------------------------------------------


def _exec_process(args: argparse.Namespace, record: ContainerState) -> dict[str, Any]:
    """The process to exec: --process, or the container's own process with
    the command line's changes (as runc builds it)."""
    if args.process:
        try:
            process = json.loads(Path(args.process).read_text())
        except OSError as exc:
            raise SpecError(f"cannot read {args.process}: {exc.strerror}") from exc
        except ValueError as exc:
            raise SpecError(f"{args.process} is not valid JSON: {exc}") from exc
        if not isinstance(process, dict):
            raise SpecError(f"{args.process}: a process must be a JSON object")
        if args.tty:
            process["terminal"] = True
        return process
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else \
        list(args.command)
    if not command:
        raise SpecError("exec needs a command or --process FILE")
    try:
        base = json.loads((Path(record.bundle) / "config.json").read_text())["process"]
    except (OSError, ValueError, KeyError, TypeError):
        base = {"env": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    process = dict(base)
    process["args"] = command
    process["terminal"] = bool(args.tty)
    process["env"] = [*process.get("env", []), *args.env]
    if args.cwd:
        process["cwd"] = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise SpecError(f"--user {args.user!r} must be UID[:GID]") from None
    if args.additional_gids:
        process.setdefault("user", {})["additionalGids"] = [int(g) for g in args.additional_gids]
    if args.cap:
        caps = process.setdefault("capabilities", {})
        for kind in ("bounding", "effective", "permitted"):
            caps[kind] = sorted({*caps.get(kind, []), *args.cap})
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    return process


def exec_(args: argparse.Namespace, store: Store) -> int:
    record = _loaded(store, args.id, "exec")
    # runc's own rule on top of the core's: a paused container only with the flag.
    if record.status == Status.PAUSED.value and not args.ignore_paused:
        raise InvalidStateError(f"cannot exec in paused container {args.id}",
                                hint="resume it first, or pass --ignore-paused")
    _refuse_preserved_fds(args)
    process = _exec_process(args, record)
    terminal = bool(process.get("terminal"))
    if terminal and not args.console_socket and (args.detach or not os.isatty(0)):
        raise SpecError("a terminal was asked for but no --console-socket was given",
                        hint="pass --console-socket, or drop --tty")
    exec_id = f"exec-{os.urandom(8).hex()}"
    if args.detach:
        return _exec_detached(args, record, exec_id, process, terminal)
    from pykata.host.terminal import raw_terminal
    from pykata.oci.relay import relay_exec

    stdio, master = _exec_stdio(terminal, args.console_socket)
    _join_pod_cgroup(record)
    with raw_terminal(0) if terminal and not args.console_socket else contextlib.nullcontext():
        _write_pid_file(args.pid_file, os.getpid())
        return _arun(relay_exec(record.control_socket, record.id, exec_id, process, stdio,
                                terminal, pty_master=master))


def _join_pod_cgroup(record: ContainerState) -> None:
    """An exec relay is one of the pod's host processes: it joins the
    cgroups of the pod's owner (the pod's own with sandbox_cgroup_only, or
    the caller's), so the pod's accounting includes it."""
    from pykata.host.cgroups import CgroupError, join_cgroups_of

    if not monitor_alive(record):  # a reused pid is someone else's
        return
    try:
        join_cgroups_of(record.monitor_pid)
    except CgroupError as exc:
        # Logged, not printed: stderr may be the exec'd process's own.
        logging.getLogger(__name__).warning("the exec relay stays in its caller's "
                                            "cgroups: %s", exc)


def _exec_stdio(terminal: bool, console_socket: str) -> tuple[tuple[int, int, int], int]:
    """The exec's stdio, and a copy of its pty master (-1 without one)."""
    if terminal and console_socket:
        return _console_stdio(console_socket)
    return (0, 1, 2), -1


def _exec_detached(args: argparse.Namespace, record: ContainerState, exec_id: str,
                   process: dict[str, Any], terminal: bool) -> int:
    from pykata.host import hostio
    from pykata.oci.relay import relay_exec

    stdio, master = _exec_stdio(terminal, args.console_socket)

    def relay(ready_w: int) -> int:
        os.setsid()
        _join_pod_cgroup(record)
        if terminal:
            hostio.make_controlling(stdio[0])
        # The exec's stdio moves off 0-2, which go to /dev/null: nothing
        # pykata prints may land in the process's output.
        moved = (os.dup(stdio[0]), os.dup(stdio[1]), os.dup(stdio[2]))
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)

        reported: list[bool] = []

        def started(error: BaseException | None) -> None:
            message = {"ok": True} if error is None else {"error": str(error)}
            os.write(ready_w, json.dumps(message).encode() + b"\n")
            os.close(ready_w)
            reported.append(True)

        try:
            return _arun(relay_exec(record.control_socket, record.id, exec_id, process,
                                    moved, terminal, on_started=started, pty_master=master))
        except BaseException as exc:
            if not reported:
                started(exc)
            return 1

    pid = _fork_and_wait(relay, {stdio[0], master}, "the exec relay")
    _write_pid_file(args.pid_file, pid)
    return 0


# --- ps / events / pause / resume / update ----------------------------------


def ps(args: argparse.Namespace, store: Store) -> int:
    record = _loaded(store, args.id, "stats")
    if args.format == "json":
        # The host processes that stand for the container's processes: what a
        # caller can find in the host's `ps` (docker top does that).
        from pykata.runtime.state import process_start_time

        state_ = _call(record, "state")
        execs = [p.host_pid for c in state_.containers if c.id == record.id
                 for p in c.execs if p.status == "running"]
        pids = [record.monitor_pid, *(p for p in execs if p and process_start_time(p))]
        print(json.dumps(pids))
        return 0
    guest = _call(record, "guest_pids", record.id)
    print("PID (in the VM)")
    for pid in guest:
        print(pid)
    return 0


def _interval(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for unit in ("ms", "s", "m"):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)]) * units[unit]
            except ValueError:
                break
            if value > 0:
                return value
    raise PykataError(f"invalid --interval {text!r}", hint="use a duration such as 5s")


def events(args: argparse.Namespace, store: Store) -> int:
    interval = _interval(args.interval)
    record = _loaded(store, args.id, "stats")
    return _arun(_events(record, once=args.stats, interval=interval))


async def _events(record: ContainerState, *, once: bool, interval: float) -> int:
    import asyncio

    from pykata.runtime.control_client import PodClient

    client = await PodClient.connect(record.control_socket, f"container {record.id}")
    try:
        while True:
            try:
                stats = await client.agent.stats_container(record.id)
            except PykataError:
                if once:
                    raise
                return 0
            print(json.dumps({"type": "stats", "id": record.id, "data": stats_json(stats)}),
                  flush=True)
            if once:
                return 0
            await asyncio.sleep(interval)
    finally:
        await client.close()


def stats_json(stats: Any) -> dict[str, Any]:
    """The agent's cgroup statistics in the shape of runc's `events --stats`."""
    cg = stats.cgroup_stats
    cpu, mem, pids = cg.cpu_stats, cg.memory_stats, cg.pids_stats
    return {
        "cpu": {"usage": {"total": cpu.cpu_usage.total_usage,
                          "percpu": list(cpu.cpu_usage.percpu_usage),
                          "kernel": cpu.cpu_usage.usage_in_kernelmode,
                          "user": cpu.cpu_usage.usage_in_usermode},
                "throttling": {"periods": cpu.throttling_data.periods,
                               "throttledPeriods": cpu.throttling_data.throttled_periods,
                               "throttledTime": cpu.throttling_data.throttled_time}},
        "memory": {"cache": mem.cache,
                   "usage": {"usage": mem.usage.usage, "max": mem.usage.max_usage,
                             "failcnt": mem.usage.failcnt, "limit": mem.usage.limit},
                   "stats": dict(mem.stats)},
        "pids": {"current": pids.current, "limit": pids.limit},
    }


def pause(args: argparse.Namespace, store: Store) -> int:
    record = _loaded(store, args.id, "pause")
    _call(record, "pause", record.id)
    return 0


def resume(args: argparse.Namespace, store: Store) -> int:
    record = _loaded(store, args.id, "resume")
    _call(record, "resume", record.id)
    return 0


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise PykataError(f"invalid size {text!r}", hint="use bytes or a k/m/g suffix") from None


def update(args: argparse.Namespace, store: Store) -> int:
    if args.resources:
        raw = sys.stdin.read() if args.resources == "-" else _read(args.resources)
        try:
            resources = json.loads(raw)
        except ValueError as exc:
            raise SpecError(f"the resources are not valid JSON: {exc}") from exc
        if not isinstance(resources, dict):
            raise SpecError("the resources must be a JSON object (LinuxResources)")
    else:
        resources = {}
    if args.memory:
        resources.setdefault("memory", {})["limit"] = _bytes(args.memory)
    if args.memory_swap:
        resources.setdefault("memory", {})["swap"] = _bytes(args.memory_swap)
    if args.pids_limit is not None:
        resources["pids"] = {"limit": args.pids_limit}
    for flag, key in (("cpu_shares", "shares"), ("cpu_quota", "quota"),
                      ("cpu_period", "period")):
        if getattr(args, flag) is not None:
            resources.setdefault("cpu", {})[key] = getattr(args, flag)
    if args.cpuset_cpus:
        resources.setdefault("cpu", {})["cpus"] = args.cpuset_cpus
    record = _loaded(store, args.id, "update")
    _call(record, "update", record.id, json.dumps(resources).encode())
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from exc


# --- spec / features / unsupported ------------------------------------------


def spec(args: argparse.Namespace, store: Store) -> int:
    from pykata.runtime.spec import default_spec

    target = Path(args.bundle or ".") / "config.json"
    if target.exists():
        raise PykataError(f"{target} exists already", hint="remove it first")
    target.write_text(json.dumps(default_spec(["sh"], terminal=True), indent=2) + "\n")
    return 0


FEATURES: dict[str, Any] = {
    "ociVersionMin": "1.0.0",
    "ociVersionMax": "1.3.0",  # pykata.spec_fields.MAX_VERSION
    "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop"],
    "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec", "private",
                     "rprivate", "shared", "rshared", "slave", "rslave"],
    "linux": {
        "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts", "user"],
        # systemd: --systemd-cgroup's slice:prefix:name paths are laid out as
        # systemd would, without asking it over D-Bus (README, Host cgroups).
        "cgroup": {"v1": True, "v2": True, "systemd": True, "systemdUser": False},
        "seccomp": {"enabled": True},
        "apparmor": {"enabled": False},
        "selinux": {"enabled": False},
    },
    "annotations": {
        "io.katacontainers.pykata.isolation": "vm",
    },
}


def features(args: argparse.Namespace, store: Store) -> int:
    write_json(FEATURES)
    return 0


def unsupported(args: argparse.Namespace, store: Store) -> int:
    raise PykataError(f"{args.verb} is not supported: a container's state lives in its VM",
                      hint="pykata cannot checkpoint or restore containers")


VERBS: dict[str, Callable[[argparse.Namespace, Store], int]] = {
    "create": create, "start": start, "run": run, "state": state, "list": list_,
    "ls": list_, "kill": kill, "delete": delete, "exec": exec_, "ps": ps, "events": events,
    "pause": pause, "resume": resume, "update": update, "spec": spec, "features": features,
    "checkpoint": unsupported, "restore": unsupported,
}
