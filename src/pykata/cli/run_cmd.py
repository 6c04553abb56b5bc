"""`pykata run`: one command in a container in its own VM, stdio attached."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata import config as config_mod
from pykata.errors import PykataError, SpecError
from pykata.host.hostio import FdReader, FdWriter
from pykata.host.mounts import Mount
from pykata.host.terminal import raw_terminal, terminal_size
from pykata.runtime.container import Container, bind_rootfs, overlay_rootfs
from pykata.runtime.exit_status import start_failure_status
from pykata.runtime.pod import Pod
from pykata.runtime.sandbox import SandboxOptions
from pykata.runtime.spec import default_spec, load_bundle
from pykata.runtime.stdio import Sink, Source
from pykata.runtime.volumes import Volume, plan_volumes

# A file to write phase timings to (the benchmark sets it).
TIMINGS_ENV = "PYKATA_TIMINGS"
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# After a forwarded signal, how long the container has to exit before SIGKILL.
STOP_GRACE_SECONDS = 10.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command in a new container, in its own VM",
        description="Run CMD in a new container inside its own VM and exit with its "
        "exit code (128+N when killed by signal N; 127 when CMD does not exist, 126 "
        "when it cannot be executed). Without --rootfs or --bundle the built-in "
        "busybox image is used.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rootfs", metavar="DIR", type=Path, help="root filesystem directory")
    src.add_argument("--bundle", metavar="DIR", type=Path, help="OCI bundle (config.json + rootfs)")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal in the guest")
    p.add_argument("-i", "--interactive", action="store_true", help="pass stdin to the container")
    p.add_argument("--memory", metavar="MiB", type=int, help="guest memory in MiB")
    p.add_argument("--cpus", metavar="N", type=int, help="guest vCPUs")
    p.add_argument("--env", "-e", metavar="NAME=VALUE", action="append", default=[],
                   help="set an environment variable (repeatable)")
    p.add_argument("--workdir", "-w", metavar="DIR", default="/", help="working directory")
    p.add_argument("--volume", "-v", metavar="HOST:CONTAINER[:ro]", action="append",
                   default=[], type=_volume,
                   help="share a host directory or file into the container (repeatable)")
    p.add_argument("--netns", metavar="PATH", default="",
                   help="a network namespace whose interfaces, addresses and routes "
                        "the VM takes over (tcfilter)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="command to run")
    p.set_defaults(handler=run)


def _volume(text: str) -> dict[str, Any]:
    """An OCI bind mount from `HOST:CONTAINER[:ro|:rw]`."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:CONTAINER[:ro] with CONTAINER an absolute path")
    return {"destination": parts[1], "type": "bind",
            "source": os.path.abspath(parts[0]), "options": ["rbind", mode]}


def _command(args: argparse.Namespace) -> list[str]:
    cmd: list[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def _spec_and_rootfs(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], Any, list[tuple[int, Volume]]]:
    spec, rootfs = _base_spec_and_rootfs(args)
    spec.setdefault("mounts", []).extend(args.volume)
    # Checked before a VM boots: a missing host path should not cost a boot.
    return spec, rootfs, plan_volumes(spec["mounts"], args.bundle)


def _base_spec_and_rootfs(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    cmd = _command(args)
    if args.bundle is not None:
        spec, root = load_bundle(args.bundle)
        if cmd:
            spec["process"]["args"] = cmd
        spec["process"]["terminal"] = bool(args.tty)
        mounts = bind_rootfs(root)
        return spec, lambda _c: mounts
    if not cmd:
        raise SpecError("no command given", hint="usage: pykata run [options] -- CMD [ARG...]")
    spec = default_spec(cmd, terminal=bool(args.tty), env=args.env, cwd=args.workdir)
    if args.rootfs is not None:
        mounts = bind_rootfs(args.rootfs)
        return spec, lambda _c: mounts
    from pykata.assets.busybox_image import ensure_image

    image = ensure_image()

    def overlay(container: Container) -> list[Mount]:
        return overlay_rootfs(image, container.scratch())

    return spec, overlay


@dataclass
class RunResult:
    exit_code: int
    phases: dict[str, float] = field(default_factory=dict)


class _TerminalIO:
    """`pykata run`'s own stdio, as the container's process's (closed by
    `run` once the container is gone)."""

    def __init__(self, stdout: Sink | None, stderr: Sink | None, stdin: Source | None) -> None:
        self.stdout, self.stderr, self.stdin = stdout, stderr, stdin

    async def close(self) -> None:
        pass

    def close_stdin(self) -> None:
        pass


def run(args: argparse.Namespace) -> int:
    entered = time.time()
    cfg = config_mod.load(args.config)
    if args.debug and not cfg.runtime.enable_debug:
        from dataclasses import replace

        cfg = replace(cfg, runtime=replace(cfg.runtime, enable_debug=True))
    spec, rootfs, volumes = _spec_and_rootfs(args)
    from pykata.runtime.pod_cgroup import container_request, placement_from_spec

    options = SandboxOptions(
        vcpus=args.cpus, memory_mib=args.memory, netns=args.netns,
        # A bundle's cgroupsPath places the pod on the host as any front end's.
        cgroup=placement_from_spec(spec) if cfg.runtime.sandbox_cgroup_only else None,
        cgroup_request=container_request(spec))
    interactive = args.interactive or (args.tty and os.isatty(0))
    try:
        with raw_terminal(0) if args.tty and interactive else contextlib.nullcontext():
            result = asyncio.run(_run(cfg, spec, rootfs, options, interactive, args.tty,
                                      volumes))
    except PykataError as exc:
        # A command that cannot run exits as a shell's would (127, 126), as
        # `docker run` does; any other failure is pykata's own (exit 1).
        status = start_failure_status(exc)
        if status is None:
            raise
        print(f"pykata: {exc}", file=sys.stderr)
        return status
    timings = os.environ.get(TIMINGS_ENV)
    if timings:
        _write_timings(Path(timings), entered, result.phases)
    return result.exit_code


def _write_timings(path: Path, entered: float, phases: dict[str, float]) -> None:
    """For the benchmark: when the verb started (wall clock) and each phase."""
    path.write_text(json.dumps({"entered": entered, "exited": time.time(), **phases}))


async def _run(
    cfg: config_mod.Config, spec: dict[str, Any], rootfs: Any, options: SandboxOptions,
    interactive: bool, tty: bool, volumes: list[tuple[int, Volume]],
) -> RunResult:
    out, err = FdWriter(1), FdWriter(2)
    stdin = FdReader(0).read if interactive else None
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    interrupted: list[int] = []

    def interrupt(sig: int) -> None:
        # Before the container runs there is nobody to pass the signal to:
        # stop starting, and let the teardown remove what was made so far.
        if not interrupted and main is not None:
            interrupted.append(sig)
            main.cancel()

    for sig in _FORWARDED:
        loop.add_signal_handler(sig, interrupt, sig)
    io = _TerminalIO(out.write, None if tty else err.write, stdin)
    try:
        result = await _run_pod(cfg, spec, rootfs, io, options, volumes, tty,
                                profile_boot=bool(os.environ.get(TIMINGS_ENV)))
    except asyncio.CancelledError:
        if not interrupted:
            raise
        result = RunResult(128 + interrupted[0])
    finally:
        for sig in (*_FORWARDED, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        await out.close()
        await err.close()
    return result


async def _run_pod(cfg: config_mod.Config, spec: dict[str, Any], rootfs: Any,
                   io: _TerminalIO, options: SandboxOptions,
                   volumes: list[tuple[int, Volume]], tty: bool, *,
                   profile_boot: bool) -> RunResult:
    """Boot a pod, run `spec` in it until its init exits, end the pod. The
    phases are timed apart because the benchmark reports each one (with
    `profile_boot`, the guest's own boot steps too, as guest_*)."""
    from pykata.factory.sources import vm_source
    from pykata.runtime.owner import new_pod, start_pod
    from pykata.runtime.pod import PodPolicy

    pod = new_pod(f"run-{secrets.token_hex(6)}", cfg, options, key=None, front_end="run",
                  source=vm_source(cfg), policy=PodPolicy(ends_with_init=True))
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    owned = await start_pod(pod)
    try:
        times = pod.sandbox.times
        phases.update(vm_launch=times.vm_launch, vm_boot_to_agent=times.agent_ready,
                      sandbox_create=times.sandbox_create)
        if profile_boot and pod.sandbox.agent is not None:
            # The guest's own steps, on its clock: 0 is its kernel's start.
            for step, seconds in (await pod.sandbox.agent.boot_profile()).items():
                phases[f"guest_{step}"] = seconds
        t1 = time.monotonic()
        container = await pod.create_container(pod.id, spec, rootfs, io=io, volumes=volumes)
        await pod.start_process(container.id)
        phases["container_create_start"] = time.monotonic() - t1
        _forward_signals(pod, container.id, tty)
        await pod.ended.wait()
        code = container.init.exit_status
    finally:
        t2 = time.monotonic()
        await owned.close()
        phases["teardown"] = time.monotonic() - t2
    phases["total_in_process"] = time.monotonic() - t0
    return RunResult(code, phases)


def _forward_signals(pod: Pod, container_id: str, tty: bool) -> None:
    """Once the container runs: the signals `pykata run` gets go to it, and
    the terminal's size follows the user's."""
    loop = asyncio.get_running_loop()
    if tty:
        _resize_later(pod, container_id)
        loop.add_signal_handler(signal.SIGWINCH, _resize_later, pod, container_id)
    for sig in _FORWARDED:
        loop.add_signal_handler(sig, _signal_later, pod, container_id, sig)


# Signal handlers start these; the set keeps each task referenced until done.
_pending: set[asyncio.Task[None]] = set()


def _spawn(call: Any) -> None:
    task = asyncio.ensure_future(_quiet(call))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def _resize_later(pod: Pod, container_id: str) -> None:
    rows, cols = terminal_size()
    _spawn(pod.resize(container_id, "", rows, cols))


def _signal_later(pod: Pod, container_id: str, sig: int) -> None:
    _spawn(pod.kill(container_id, "", sig))
    # The container's init ignores a signal it has no handler for (it is
    # PID 1 of its namespace); a user who asked `pykata run` to stop gets
    # it stopped, as `docker stop` does, after a grace period.
    asyncio.get_running_loop().call_later(STOP_GRACE_SECONDS, _kill_now, pod, container_id)


def _kill_now(pod: Pod, container_id: str) -> None:
    _spawn(pod.kill(container_id, "", signal.SIGKILL))


async def _quiet(call: Any) -> None:
    with contextlib.suppress(PykataError):
        await call
