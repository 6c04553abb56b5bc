"""The monitor: the owner of an OCI container's pod. It holds the `Pod`
(the VM, the container), serves the pod's control socket (which every later
verb talks to), relays the init's stdio, and exits with its exit status.

It is forked by `create` and stays in the caller's process tree (after
`create` exits it is reparented to the caller's subreaper: containerd's runc
shim or conmon), because its pid is the container's pid on the host: it
lives as long as the container's init, passes the signals it gets to it,
and exits with its status (128+N for a signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.host import hostio
from pykata.oci.launch import Launch
from pykata.oci.store import NETNS_PIN, pin_netns, release_netns
from pykata.runtime.container import bind_rootfs
from pykata.runtime.control import ControlHooks
from pykata.runtime.hooks import run_hooks, spec_hooks, strip_host_hooks
from pykata.runtime.lifecycle import VM_DIED_STATUS, Status
from pykata.runtime.owner import OwnedPod, new_pod, start_pod
from pykata.runtime.pod import Pod, PodEvent, PodPolicy
from pykata.runtime.process import PodProcess
from pykata.runtime.ready import ReadyReport
from pykata.runtime.spec import network_namespace, network_namespace_path
from pykata.runtime.spec_versions import poststart_failure_stops
from pykata.runtime.state import ContainerState, process_start_time, rfc3339, write_state
from pykata.runtime.stdio import Sink, Source

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


class DescriptorIO:
    """The container's stdio on the descriptors `create` was given (or the
    slave of its pty), as the pod relays them (`ProcessIO`). What is queued
    is written out at teardown (`written`), for as long as the caller reads."""

    def __init__(self, stdio: tuple[int, int, int], terminal: bool) -> None:
        self._writers = [hostio.FdWriter(stdio[1])]
        if not terminal:
            self._writers.append(hostio.FdWriter(stdio[2]))
        self._reader = hostio.FdReader(stdio[0])

    @property
    def stdout(self) -> Sink | None:
        return self._writers[0].write

    @property
    def stderr(self) -> Sink | None:
        return self._writers[1].write if len(self._writers) > 1 else None

    @property
    def stdin(self) -> Source | None:
        return self._reader.read

    async def close(self) -> None:
        pass  # the writers finish at teardown, not before the exit is saved

    def close_stdin(self) -> None:
        pass

    async def written(self, timeout: float) -> None:
        for writer in self._writers:
            # A reader that stopped reading must not hold the monitor forever.
            await writer.close(timeout)


class Monitor:
    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        from pykata import config as config_mod

        self.config = config_mod.load(launch.config_path)
        self.owned: OwnedPod | None = None
        self.pod: Pod | None = None
        self.io: DescriptorIO | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self.created = rfc3339(time.time())

    @property
    def init(self) -> PodProcess | None:
        container = self.pod.containers.get(self.launch.id) if self.pod else None
        return container.init if container is not None else None

    # --- state ----------------------------------------------------------

    def save(self) -> None:
        """The container's record under --root, from the pod's state: what
        `state` and `list` read without asking the monitor."""
        pod, init = self.pod, self.init
        sandbox = pod.sandbox if pod is not None else None
        status = init.status if init is not None else Status.CREATING
        if pod is not None and pod.lifecycle.stopped and init is None:
            status = Status.STOPPED
        write_state(self.launch.state_dir / "state.json", ContainerState(
            id=self.launch.id,
            bundle=str(self.launch.bundle),
            status=status.value,
            sandbox_key=sandbox.paths.key if sandbox else "",
            run_root=str(sandbox.paths.root) if sandbox else "",
            created=self.created,
            owner=self.launch.owner,
            rootfs=str(self.launch.rootfs),
            annotations=self.launch.annotations,
            monitor_pid=os.getpid(),
            monitor_start=process_start_time(os.getpid()),
            control_socket=sandbox.control_socket if sandbox else "",
            exit_status=init.exit_status if init is not None and init.lifecycle.stopped else -1,
            exited_at=rfc3339(init.exited_at) if init is not None and init.exited_at else "",
        ))

    def oci_state(self, status: str) -> dict[str, Any]:
        return {
            "ociVersion": self.launch.spec.get("ociVersion", "1.0.2"),
            "id": self.launch.id,
            "status": status,
            "pid": os.getpid(),
            "bundle": str(self.launch.bundle),
            "annotations": self.launch.annotations,
        }

    def _on_event(self, event: PodEvent) -> None:
        if event.container_id in ("", self.launch.id):
            self.save()

    # --- create ---------------------------------------------------------

    async def create(self) -> None:
        """Everything `create` waits for; undone by `teardown` if it fails."""
        from pykata.factory.sources import vm_source
        from pykata.runtime.pod_options import pod_options
        from pykata.runtime.volumes import plan_volumes

        launch = self.launch
        options = pod_options(launch.spec, self.config,
                              netns=container_netns(launch.spec, launch.state_dir),
                              systemd_cgroup=launch.systemd_cgroup)
        self.pod = new_pod(launch.id, self.config, options,
                           key=sandbox_key(launch.state_dir, launch.id), front_end="oci",
                           source=vm_source(self.config),
                           policy=PodPolicy(ends_with_init=True), on_event=self._on_event)
        spec = strip_host_hooks(launch.spec)
        volumes = plan_volumes(spec.get("mounts") or [], launch.bundle)
        # Before the VM boots: a prestart hook sets up the network namespace
        # the VM's devices are made from (docker's libnetwork-setkey).
        await self._run_host_hooks("prestart", "creating")
        await self._run_host_hooks("createRuntime", "creating")
        self.owned = await start_pod(self.pod, ControlHooks(on_start=self._poststart,
                                                            on_shutdown=self._shutdown))
        self.io = DescriptorIO(launch.stdio, launch.terminal)
        rootfs = bind_rootfs(launch.rootfs)
        await self.pod.create_container(launch.id, spec, lambda _c: rootfs, io=self.io,
                                        volumes=volumes, bundle=str(launch.bundle))
        self.save()

    async def _run_host_hooks(self, phase: str, status: str) -> None:
        hooks = spec_hooks(self.launch.spec, phase)
        if hooks:
            await run_hooks(hooks, self.oci_state(status), phase=phase,
                            fail_poststart=poststart_failure_stops(self.launch.spec))

    async def _poststart(self, container_id: str, exec_id: str) -> None:
        if exec_id:
            return
        try:
            await self._run_host_hooks("poststart", "running")
        except PykataError as exc:
            if not poststart_failure_stops(self.launch.spec):
                log.warning("poststart hook: %s", exc)
                return
            # runtime-spec 1.3.0, lifecycle step 9: the error fails `start`,
            # and the container is stopped.
            assert self.pod is not None
            with contextlib.suppress(PykataError):
                await self.pod.kill(self.launch.id, "", signal.SIGKILL)
            raise

    async def _shutdown(self) -> None:
        """`delete`: the container is killed (given a moment to report its
        exit), and the monitor ends."""
        assert self.pod is not None
        await self.pod.shutdown()

    # --- run ------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _forward(self, signum: int) -> None:
        if self.pod is not None and self.init is not None and not self.init.lifecycle.stopped:
            self._spawn(_quiet(self.pod.kill(self.launch.id, "", signum)))

    def _resize(self) -> None:
        if self.pod is None or not self.launch.terminal:
            return
        size = hostio.window_size(self.launch.stdio[0])
        if size is not None:
            self._spawn(_quiet(self.pod.resize(self.launch.id, "", *size)))

    async def run(self) -> int:
        """Wait until the pod ends (the init exited, the VM died, or Shutdown);
        return the init's exit status."""
        assert self.pod is not None
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._forward, sig)
        loop.add_signal_handler(signal.SIGWINCH, self._resize)
        self._resize()
        await self.pod.ended.wait()
        init = self.init
        code = init.exit_status if init is not None and init.lifecycle.stopped \
            else VM_DIED_STATUS
        self.save()
        return code

    async def teardown(self) -> None:
        if self.owned is not None:
            await self.owned.close()
        if self.io is not None:
            await self.io.written(WRITE_OUT_SECONDS)
        if self.launch.pty_master >= 0:
            await asyncio.to_thread(hostio.wait_read, self.launch.pty_master, 2.0)
            os.close(self.launch.pty_master)
            self.launch.pty_master = -1


async def _quiet(call: Any) -> None:
    with contextlib.suppress(PykataError):
        await call


async def _main(launch: Launch, ready_fd: int) -> int:
    monitor = Monitor(launch)
    try:
        try:
            await monitor.create()
        except BaseException as exc:
            ReadyReport.failure(exc, "creating the container").send(ready_fd)
            raise
        ReadyReport.success(monitor.pod.vm_pid if monitor.pod else 0).send(ready_fd)
        return await monitor.run()
    finally:
        await monitor.teardown()


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
        ReadyReport.failure(exc, "creating the container").send(ready_fd)
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
