"""The monitor process: boots the VM, creates the container, serves its
control socket, relays the init's stdio, and exits with its exit status.

It is forked by `create` and stays in the caller's process tree (after
`create` exits it is reparented to the caller's subreaper: containerd's runc
shim or conmon), because its pid is the container's pid on the host: it
lives as long as the container's init, passes the signals it gets to it,
and exits with its status (128+N for a signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.monitor.launch import Launch
from pykata.monitor.service import MonitorService
from pykata.oci.store import NETNS_PIN, pin_netns, release_netns
from pykata.runtime import hostio
from pykata.runtime.container import Container, bind_rootfs, spec_readonly_root
from pykata.runtime.hooks import run_hooks, spec_hooks, strip_host_hooks
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS, VM_DIED_STATUS, Lifecycle, Status
from pykata.runtime.mount_points import spec_mount_points
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.spec import network_namespace, network_namespace_path, spec_hostname
from pykata.runtime.state import ContainerState, process_start_time, rfc3339, write_state
from pykata.runtime.stdio import StdioRelay
from pykata.ttrpc import Server

log = logging.getLogger(__name__)

# Signals the monitor passes to the container's init. SIGKILL and SIGSTOP
# cannot be caught: SIGKILL of the monitor kills the VM, and with it the
# container, which is what SIGKILL of a container's process means.
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, signal.SIGCONT, signal.SIGTSTP,
)
CLONE_NEWNET = 0x40000000
# After the output drained from the guest, how long the caller may take to
# read the rest of it from the container's stdio.
WRITE_OUT_SECONDS = 60.0


def monitor_socket(sandbox: Sandbox) -> Path:
    return sandbox.paths.run_dir / "monitor.sock"


def sandbox_key(state_dir: Path, container_id: str) -> str:
    from pykata.runtime.keys import pod_key

    return pod_key("oci", str(state_dir.parent), container_id)


def wants_own_network(spec: dict[str, Any]) -> bool:
    """Whether the spec asks for a new network namespace (one without a path)."""
    entry = network_namespace(spec)
    return entry is not None and not entry.get("path")


def container_netns(spec: dict[str, Any], state_dir: Path) -> str:
    """The namespace whose interfaces the container's VM mirrors: the one the
    spec names (podman's), or the monitor's own (docker's, set up by its
    prestart hook) by its pin in the container's directory; "" for a
    container without a network namespace. The sandbox records this path, and
    `delete` or `pykata cleanup` enter it after a killed monitor: it must
    never come to name another process's namespace (as /proc/<pid>/ns/net
    does once the pid is reused)."""
    path = network_namespace_path(spec)
    if path:
        return path
    return str(state_dir / NETNS_PIN) if wants_own_network(spec) else ""


def isolate_network(spec: dict[str, Any], state_dir: Path) -> bool:
    """A container that asks for a network namespace of its own gets one on
    the host too, with the monitor (and so QEMU) in it: callers' hooks that
    set up the container's network (docker's libnetwork-setkey) find it at
    /proc/<pid>/ns/net and must not touch the host's. It is pinned in the
    container's directory (see `container_netns`). Whether it made one."""
    if not wants_own_network(spec):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise PykataError(f"cannot create a network namespace: {os.strerror(err)}")
    pin_netns(state_dir)
    return True


class Monitor:
    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        from pykata import config as config_mod

        self.config = config_mod.load(launch.config_path)
        self.lifecycle = Lifecycle("container", launch.id)
        self.sandbox: Sandbox | None = None
        self.container: Container | None = None
        self.service: MonitorService | None = None
        self.server: Server | None = None
        self.relay: StdioRelay | None = None
        self._writers: list[hostio.FdWriter] = []
        self._shutdown = asyncio.Event()
        self._pending: set[asyncio.Task[Any]] = set()
        self.created = rfc3339(time.time())

    # --- state ----------------------------------------------------------

    def save(self) -> None:
        sandbox = self.sandbox
        write_state(self.launch.state_dir / "state.json", ContainerState(
            id=self.launch.id,
            bundle=str(self.launch.bundle),
            status=self.lifecycle.status.value,
            sandbox_key=sandbox.paths.key if sandbox else "",
            run_root=str(sandbox.paths.root) if sandbox else "",
            created=self.created,
            owner=self.launch.owner,
            rootfs=str(self.launch.rootfs),
            annotations=self.launch.annotations,
            monitor_pid=os.getpid(),
            monitor_start=process_start_time(os.getpid()),
            monitor_socket=sandbox.monitor_socket if sandbox else "",
            exit_status=self.service.exit_status if self.service else -1,
            exited_at=rfc3339(time.time()) if self.lifecycle.stopped else "",
        ))

    def oci_state(self) -> dict[str, Any]:
        return {
            "ociVersion": self.launch.spec.get("ociVersion", "1.0.2"),
            "id": self.launch.id,
            "status": self.lifecycle.status.value,
            "pid": os.getpid(),
            "bundle": str(self.launch.bundle),
            "annotations": self.launch.annotations,
        }

    # --- create ---------------------------------------------------------

    async def create(self) -> None:
        """Everything `create` waits for; undone by `teardown` if it fails."""
        from pykata.shim.annotations import sandbox_options

        launch = self.launch
        options = sandbox_options(launch.annotations, self.config)
        options = dataclasses.replace(options,
                                      netns=container_netns(launch.spec, launch.state_dir),
                                      hostname=spec_hostname(launch.spec, options.hostname))
        self.sandbox = sandbox = Sandbox(
            launch.id, self.config, options, key=sandbox_key(launch.state_dir, launch.id),
            front_end="oci")
        sandbox.monitor_socket = str(monitor_socket(sandbox))
        # Before the VM boots: a prestart hook sets up the network namespace
        # the VM's devices are made from (docker's libnetwork-setkey).
        await self._run_host_hooks("prestart")
        await self._run_host_hooks("createRuntime")
        await sandbox.start()
        self.container = container = Container(sandbox, launch.id)
        self.service = MonitorService(container, self.lifecycle, self.save,
                                      self._poststart, self._shutdown.set)
        from pykata.runtime.volumes import plan_volumes

        spec = strip_host_hooks(launch.spec)
        volumes = plan_volumes(spec.get("mounts") or [], launch.bundle)
        container.share_rootfs(bind_rootfs(launch.rootfs), readonly=spec_readonly_root(spec),
                              mount_points=spec_mount_points(spec))
        try:
            await container.create(spec, volumes=volumes)
        except PykataError as exc:
            raise await sandbox.explain(exc) from exc
        self._start_stdio()
        self.lifecycle.move(Status.CREATED)
        self.server = Server()
        self.service.register(self.server)
        await self.server.serve_unix(sandbox.monitor_socket)
        os.chmod(sandbox.monitor_socket, 0o600)
        self.save()

    def _start_stdio(self) -> None:
        assert self.sandbox is not None and self.sandbox.agent is not None
        stdin, stdout, stderr = self.launch.stdio
        out = hostio.FdWriter(stdout)
        self._writers.append(out)
        err = None
        if not self.launch.terminal:
            err = hostio.FdWriter(stderr)
            self._writers.append(err)
        self.relay = StdioRelay(self.sandbox.agent, self.launch.id, self.launch.id)
        self.relay.start(out.write, err.write if err else None, hostio.FdReader(stdin).read,
                         terminal=self.launch.terminal)

    async def _run_host_hooks(self, phase: str) -> None:
        hooks = spec_hooks(self.launch.spec, phase)
        if not hooks:
            return
        state = self.oci_state()
        if phase == "prestart" or phase == "createRuntime":
            state["status"] = "creating"
        await run_hooks(hooks, state, phase=phase)

    async def _poststart(self) -> None:
        try:
            await self._run_host_hooks("poststart")
        except PykataError as exc:
            log.warning("poststart hook: %s", exc)

    # --- run ------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _forward(self, signum: int) -> None:
        if self.container is None or self.lifecycle.stopped:
            return
        self._spawn(_quiet(self.container.kill(signum)))

    def _resize(self) -> None:
        if self.container is None or not self.launch.terminal:
            return
        size = hostio.window_size(self.launch.stdio[0])
        if size is not None:
            self._spawn(_quiet(self.container.agent.resize(
                self.launch.id, self.launch.id, *size)))

    async def run(self) -> int:
        """Wait for the init's exit (or Shutdown), record it, end the VM."""
        assert self.container is not None and self.service is not None
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._forward, sig)
        loop.add_signal_handler(signal.SIGWINCH, self._resize)
        self._resize()
        wait = asyncio.ensure_future(self.container.wait())
        shutdown = asyncio.ensure_future(self._shutdown.wait())
        vm = asyncio.ensure_future(self._vm_exit())
        done, _ = await asyncio.wait({wait, shutdown, vm}, return_when=asyncio.FIRST_COMPLETED)
        code = VM_DIED_STATUS
        if wait in done and wait.exception() is None:
            code = wait.result()
            if self.relay is not None:
                await self.relay.drain(OUTPUT_DRAIN_SECONDS)
        elif shutdown in done:
            with contextlib.suppress(PykataError, asyncio.TimeoutError):
                await asyncio.wait_for(self.container.kill(signal.SIGKILL), 5)
            with contextlib.suppress(PykataError, asyncio.TimeoutError):
                code = await asyncio.wait_for(asyncio.shield(wait), 5)
        else:
            log.error("the VM stopped before the container exited")
        for task in (wait, shutdown, vm):
            task.cancel()
        self.service.exit_status = code
        self.lifecycle.move(Status.STOPPED)
        self.save()
        return code

    async def _vm_exit(self) -> None:
        assert self.sandbox is not None and self.sandbox.vm is not None
        await self.sandbox.vm.wait()

    async def teardown(self) -> None:
        if self.server is not None:
            await self.server.aclose()
            with contextlib.suppress(OSError):
                monitor_socket_path = self.sandbox.monitor_socket if self.sandbox else ""
                if monitor_socket_path:
                    os.unlink(monitor_socket_path)
        if self.relay is not None:
            await self.relay.close()
        for writer in self._writers:
            # A reader that stopped reading must not hold the VM forever.
            await writer.close(WRITE_OUT_SECONDS)
        if self.launch.pty_master >= 0:
            await asyncio.to_thread(hostio.wait_read, self.launch.pty_master, 2.0)
            os.close(self.launch.pty_master)
            self.launch.pty_master = -1
        if self.container is not None:
            with contextlib.suppress(PykataError):
                await self.container.delete()
        if self.sandbox is not None:
            await self.sandbox.stop()


async def _quiet(call: Any) -> None:
    with contextlib.suppress(PykataError):
        await call


async def _main(launch: Launch, ready_fd: int) -> int:
    monitor = Monitor(launch)
    try:
        try:
            await monitor.create()
        except BaseException as exc:
            _report(ready_fd, exc)
            raise
        os.write(ready_fd, b'{"ok": true}\n')
        os.close(ready_fd)
        return await monitor.run()
    finally:
        await monitor.teardown()


def _report(ready_fd: int, exc: BaseException) -> None:
    message: dict[str, object]
    if isinstance(exc, PykataError):
        from pykata.runtime.exit_status import start_failure_status

        message = {"error": exc.message, "hint": exc.hint or "", "kind": type(exc).__name__,
                   "status": start_failure_status(exc)}
    elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        message = {"error": "interrupted while creating the container", "hint": "",
                   "kind": "Interrupted"}
    else:
        log.exception("monitor failed")
        message = {"error": f"internal error: {exc!r}", "hint": "", "kind": "InternalError"}
    with contextlib.suppress(OSError):
        os.write(ready_fd, json.dumps(message).encode() + b"\n")
        os.close(ready_fd)


def run_forked(launch: Launch, ready_fd: int) -> int:
    """The body of the forked monitor; returns its exit status."""
    os.setsid()
    if launch.terminal:
        hostio.make_controlling(launch.stdio[0])
    # The container's stdio stays on the descriptors in `launch.stdio`; the
    # monitor's own 0, 1 and 2 go elsewhere, so that nothing pykata prints
    # ever reaches the container's output.
    log_fd = os.open(launch.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    logging.basicConfig(
        level=logging.DEBUG if launch.debug else logging.INFO, force=True,
        format="%(asctime)s pykata-monitor[%(process)d]: %(levelname)s: %(name)s: %(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        pinned = isolate_network(launch.spec, launch.state_dir)
    except PykataError as exc:
        _report(ready_fd, exc)
        return 1
    try:
        return asyncio.run(_main(launch, ready_fd))
    except BaseException:
        return 1
    finally:
        # After the teardown, which removed the VM's redirects through the pin.
        if pinned:
            _unpin(launch.state_dir)


def _unpin(state_dir: Path) -> None:
    try:
        release_netns(state_dir)
    except PykataError as exc:
        log.error("%s", exc)
