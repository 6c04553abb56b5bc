"""A pod: one sandbox (its VM), its containers and their processes.

This is the lifecycle every front end drives: containerd's shim, the
runc-compatible command line's monitor and `pykata run` each hold one `Pod`
in their own process (the pod's owner) and only translate their callers'
requests into its methods and its events into their callers' terms.

Every operation is require → act → move → save: the status of the pod,
container or process is checked against `lifecycle.REQUIRES` first (a wrong
call raises InvalidStateError and changes nothing), then the guest is asked,
then the status moves and the sandbox's saved state is rewritten. The pod
watches what the guest does by itself: a process's exit (recorded only
after its output reached the front end), an out-of-memory kill, the VM's
death (every process then exits with VM_DIED_STATUS).

`PodPolicy` holds what the front ends differ in: an OCI container and a
`pykata run` end with their container's init; a containerd pod lives until
its last container is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pykata import tracing
from pykata.channels import CONTAINER_TYPE_KEY
from pykata.errors import (
    AgentError,
    AlreadyExistsError,
    InvalidStateError,
    NotFoundError,
    PykataError,
    SpecError,
)
from pykata.host.mounts import Mount
from pykata.protocols import agent_pb2
from pykata.protocols.oci_spec import InvalidSpecError, process_from_json, resources_from_json
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.container import Container, spec_readonly_root
from pykata.runtime.event_log import PodEventLog, describe_pod_event
from pykata.runtime.lifecycle import VM_DIED_STATUS, Lifecycle, Status
from pykata.runtime.mount_points import spec_mount_points
from pykata.runtime.paths import check_id
from pykata.runtime.pod_cgroup import (
    NO_REQUEST,
    ContainerRequest,
    container_request,
    merge_update,
    pod_limits,
    widest,
)
from pykata.runtime.process import PodProcess, ProcessIO
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.spec_versions import check_process, check_resources
from pykata.runtime.volumes import Volume

log = logging.getLogger(__name__)

# OOM reports from the guest: at most one event per container per interval,
# and a bounded rate of polls however fast the guest answers.
OOM_INTERVAL = 1.0
OOM_POLLS_PER_SECOND = 100
# How long a shutdown lets killed processes report their exit.
SHUTDOWN_EXIT_SECONDS = 5.0
# How long CloseIO lets input already sent flow to the process.
CLOSE_INPUT_GRACE = 10.0

RootfsMounts = Callable[[Container], Sequence[Mount]]


@dataclass(frozen=True)
class PodPolicy:
    # The pod ends when its first container's init exits (an OCI container,
    # `pykata run`); otherwise when its last container is deleted (containerd).
    ends_with_init: bool = False


@dataclass(frozen=True)
class PodEvent:
    """Something that happened to the pod, for its front end to pass on."""

    # created, started, exec-added, exec-started, exited, paused, resumed,
    # deleted, oom or stopped.
    kind: str
    container_id: str = ""
    exec_id: str = ""
    exit_status: int = 0
    exited_at: float = 0.0


class PodContainer:
    """A container of the pod: its host side, its init process, its execs."""

    def __init__(self, container: Container, init: PodProcess, bundle: str,
                 request: ContainerRequest = NO_REQUEST) -> None:
        self.container = container
        self.init = init
        self.bundle = bundle
        self.execs: dict[str, PodProcess] = {}
        # What it asks of the pod's host limits (its linux.resources).
        self.request = request

    @property
    def id(self) -> str:
        return self.container.id

    @property
    def lifecycle(self) -> Lifecycle:
        return self.init.lifecycle

    def processes(self) -> list[PodProcess]:
        return [self.init, *self.execs.values()]

    def process(self, exec_id: str) -> PodProcess:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFoundError(f"process {exec_id} of container {self.id} does not exist")
        return proc


class Pod:
    def __init__(self, sandbox: Sandbox, *, policy: PodPolicy = PodPolicy(),
                 on_event: Callable[[PodEvent], None] | None = None) -> None:
        self.sandbox = sandbox
        self.policy = policy
        self._on_event = on_event
        self.lifecycle = Lifecycle("pod", sandbox.id)
        self.containers: dict[str, PodContainer] = {}
        # Set when the pod's owner may go: the pod stopped, or (ends_with_init)
        # its first container's init exited.
        self.ended = asyncio.Event()
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._teardown: asyncio.Task[None] | None = None
        # What `pykata events` shows (runtime.event_log): fed by the pod's
        # steps (_emit), every agent call and the VM's exit.
        self.events = PodEventLog()
        sandbox.agent_observers.append(self.events.observe_call)
        # The pod's trace (tracing on): its root span, from start to teardown.
        self.trace: tracing.PodTrace | None = None

    # --- what the front ends read -----------------------------------------

    @property
    def id(self) -> str:
        return self.sandbox.id

    @property
    def vm_pid(self) -> int:
        """QEMU's pid: what containerd is told is every task's pid."""
        vm = self.sandbox.vm
        return (vm.pid or 0) if vm is not None else 0

    def container(self, container_id: str) -> PodContainer:
        found = self.containers.get(container_id)
        if found is None:
            raise NotFoundError(f"container {container_id} does not exist")
        return found

    def process(self, container_id: str, exec_id: str = "") -> PodProcess:
        return self.container(container_id).process(exec_id)

    # --- the pod ------------------------------------------------------------

    async def start(self) -> None:
        """Boot the sandbox (its VM, the agent, the guest's sandbox); a failed
        start leaves nothing behind and the pod stopped."""
        if self.lifecycle.status is not Status.CREATING:
            raise InvalidStateError(f"pod {self.id} is {self.lifecycle.status.value}: "
                                    "it starts once")
        self.events.add("pod", f"starting ({self.sandbox.front_end})")
        self.trace = tracing.pod_trace("pod", **{"pykata.pod": self.id})
        try:
            with tracing.span("pod.start", self.trace):
                await self.sandbox.start()
        except BaseException as exc:
            self.events.add("pod", f"start failed: {exc}", error=True)
            self.lifecycle.move(Status.STOPPED)
            self.ended.set()
            tracing.end(self.trace, exc)
            raise
        self.events.pod_started(self.sandbox)
        self.lifecycle.move(Status.RUNNING)
        self._save()
        self._spawn(self._watch_vm())
        self._spawn(self._watch_oom())

    async def stop(self) -> None:
        """End the pod: every container removed (in the guest and on the host),
        the VM stopped, the sandbox's host state gone. Safe to repeat."""
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        # Shielded: a caller cancelled half-way (a closed connection, a
        # deadline) must not leave the pod stopped on paper with its VM, mounts
        # and redirects still there; the next `stop` waits for the same end.
        if self._teardown is None:
            if self.lifecycle.stopped:
                return
            self._teardown = asyncio.ensure_future(self._tear_down())
        await asyncio.shield(self._teardown)

    async def _tear_down(self) -> None:
        try:
            with tracing.span("pod.teardown", self.trace):
                await self._tear_down_traced()
        finally:
            tracing.end(self.trace)

    async def _tear_down_traced(self) -> None:
        self._stopping = True
        try:
            for pod_container in list(self.containers.values()):
                try:
                    await self._remove(pod_container)
                except Exception:
                    log.exception("removing container %s", pod_container.id)
        finally:
            try:
                await self.sandbox.stop()
            finally:
                self.lifecycle.move(Status.STOPPED)
                self.ended.set()
                for task in list(self._background):
                    task.cancel()
                self._emit(PodEvent("stopped"))

    async def shutdown(self) -> None:
        """Asked to end now (the control socket's Shutdown, `delete
        --force`): every live process is killed and given a moment to report
        its exit, then the pod ends as its policy says."""
        live = [proc for c in self.containers.values() for proc in c.processes()
                if not proc.finishing and (proc is c.init or proc.status is not Status.CREATED)]
        for proc in live:
            with contextlib.suppress(PykataError, asyncio.TimeoutError):
                await asyncio.wait_for(self._signal(proc, signal.SIGKILL, all_processes=True),
                                       SHUTDOWN_EXIT_SECONDS)
        if live:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(p.exited.wait() for p in live)),
                                       SHUTDOWN_EXIT_SECONDS)
        if self.policy.ends_with_init:
            self.ended.set()
        else:
            await self.stop()

    # --- containers -----------------------------------------------------------

    async def create_container(
        self, container_id: str, spec: dict[str, Any], rootfs: RootfsMounts, *,
        io: ProcessIO | None, volumes: Sequence[tuple[int, Volume]] | None = None,
        bundle: str = "", stdio_paths: tuple[str, str, str] = ("", "", ""),
    ) -> PodContainer:
        """Share the container's rootfs and volumes into the VM and create it
        in the guest; its init is watched from now on (a container killed
        before it started still reports its exit). Undone if it fails."""
        async with self._lock:
            self.lifecycle.require("create")
            check_id("container id", container_id)
            if container_id in self.containers:
                raise AlreadyExistsError(f"container {container_id} already exists")
            terminal = bool((spec.get("process") or {}).get("terminal"))
            init = PodProcess(container_id, "", terminal=terminal, io=io,
                              stdio_paths=stdio_paths)
            pod_container = PodContainer(Container(self.sandbox, container_id), init, bundle,
                                         container_request(spec))
            try:
                # The pod's host limits grow before the container can use them.
                self._resize_host([*self.containers.values(), pod_container])
                with tracing.span("container.create", self.trace,
                                  **{"pykata.container": container_id}):
                    await self._create(pod_container, spec, rootfs, volumes)
            except BaseException:
                await init.discard()
                with contextlib.suppress(PykataError):
                    await pod_container.container.delete()
                self._shrink_host(list(self.containers.values()))
                raise
            self.containers[container_id] = pod_container
            self._save()
        self._emit(PodEvent("created", container_id))
        return pod_container

    async def _create(self, pod_container: PodContainer, spec: dict[str, Any],
                      rootfs: RootfsMounts, volumes: Sequence[tuple[int, Volume]] | None
                      ) -> None:
        container = pod_container.container
        container.share_rootfs(rootfs(container), readonly=spec_readonly_root(spec),
                               mount_points=spec_mount_points(spec))
        share_pid = _shares_pid_namespace(spec)
        try:
            await container.create(spec, share_pid_ns=share_pid, volumes=volumes)
        except AgentError as exc:
            raise await self.sandbox.explain(exc) from exc
        agent = self.sandbox.agent
        assert agent is not None
        pod_container.init.start_relay(agent)
        self._spawn(self._watch_process(pod_container.init, container))

    async def start_process(self, container_id: str, exec_id: str = "") -> PodProcess:
        """Start a created container (its init) or a created exec'd process."""
        pod_container = self.container(container_id)
        proc = pod_container.process(exec_id)
        proc.lifecycle.require("start")
        container = pod_container.container
        try:
            with tracing.span("exec.start" if exec_id else "container.start", self.trace,
                              **{"pykata.container": container_id, "pykata.exec": exec_id}):
                if exec_id:
                    assert proc.spec is not None
                    await container.exec(exec_id, proc.spec)
                    agent = self.sandbox.agent
                    assert agent is not None
                    proc.start_relay(agent)
                else:
                    await container.start()
        except AgentError as exc:
            # The process stays created: its caller deletes it (containerd
            # does, after a failed exec), and its stdio goes then.
            raise await self.sandbox.explain(exc) from exc
        proc.lifecycle.move(Status.RUNNING)
        if exec_id:
            self._spawn(self._watch_process(proc, container))
        self._save()
        self._emit(PodEvent("exec-started" if exec_id else "started", container_id, exec_id))
        return proc

    async def add_exec(self, container_id: str, exec_id: str, process: dict[str, Any], *,
                       io: ProcessIO | None,
                       stdio_paths: tuple[str, str, str] = ("", "", "")) -> PodProcess:
        """Register an extra process in a running (or paused) container; it
        runs once started (`start_process`)."""
        pod_container = self.container(container_id)
        pod_container.lifecycle.require("exec")
        if not exec_id:
            raise SpecError("an exec'd process needs an exec id")
        check_id("exec id", exec_id)
        if exec_id in pod_container.execs:
            raise AlreadyExistsError(f"process {exec_id} already exists")
        try:
            process_from_json(process)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid process spec: {exc}") from exc
        check_process(process, "process", exec_process=True)
        proc = PodProcess(container_id, exec_id, terminal=bool(process.get("terminal")),
                          io=io, spec=process, stdio_paths=stdio_paths)
        pod_container.execs[exec_id] = proc
        self._emit(PodEvent("exec-added", container_id, exec_id))
        return proc

    async def exec(self, container_id: str, exec_id: str, process: dict[str, Any], *,
                   io: ProcessIO | None, host_pid: int = 0) -> PodProcess:
        """Add and start an extra process at once (the command line's exec),
        forgotten once its exit is recorded or its start failed: nobody
        deletes it later (a container may get an exec every few seconds, a
        healthcheck's, for its whole life)."""
        proc = await self.add_exec(container_id, exec_id, process, io=io)
        proc.host_pid = host_pid
        try:
            await self.start_process(container_id, exec_id)
        except BaseException:
            with contextlib.suppress(PykataError):
                await self.delete_process(container_id, exec_id)
            raise
        self._spawn(self._forget_after_exit(proc))
        return proc

    async def _forget_after_exit(self, proc: PodProcess) -> None:
        await proc.exited.wait()
        with contextlib.suppress(PykataError):
            await self.delete_process(proc.container_id, proc.exec_id)

    async def kill(self, container_id: str, exec_id: str, signum: int, *,
                   all_processes: bool = False) -> None:
        if not 0 < signum < 65:
            raise SpecError(f"invalid signal {signum}")
        proc = self.process(container_id, exec_id)
        proc.lifecycle.require("kill")
        with tracing.span("kill", self.trace, **{"pykata.container": container_id,
                                                 "pykata.exec": exec_id, "signal": signum}):
            await self._signal(proc, signum, all_processes=all_processes)

    async def _signal(self, proc: PodProcess, signum: int, *, all_processes: bool) -> None:
        await self.container(proc.container_id).container.kill(
            signum, all_processes=all_processes and not proc.exec_id,
            exec_id=proc.agent_exec_id)

    async def wait(self, container_id: str, exec_id: str = "") -> PodProcess:
        """The process, once its exit is recorded."""
        proc = self.process(container_id, exec_id)
        await proc.exited.wait()
        return proc

    async def pause(self, container_id: str) -> None:
        await self._pause(container_id, pause=True)

    async def resume(self, container_id: str) -> None:
        await self._pause(container_id, pause=False)

    async def _pause(self, container_id: str, *, pause: bool) -> None:
        pod_container = self.container(container_id)
        lifecycle = pod_container.lifecycle
        agent = self._agent()
        if pause:
            lifecycle.require("pause")
            await agent.pause_container(container_id)
            lifecycle.move(Status.PAUSED)
        else:
            lifecycle.require("resume")
            await agent.resume_container(container_id)
            lifecycle.move(Status.RUNNING)
        self._save()
        self._emit(PodEvent("paused" if pause else "resumed", container_id))

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """New cgroup limits (a runtime-spec LinuxResources object) for the
        container, applied in the guest and to the pod's host cgroup."""
        pod_container = self.container(container_id)
        pod_container.lifecycle.require("update")
        try:
            proto = resources_from_json(resources)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid resources: {exc}") from exc
        for note in check_resources(resources, "resources"):
            log.warning("container %s: %s: dropped", container_id, note)
        request = merge_update(pod_container.request, resources)
        others = [c.request for c in _live(self.containers.values()) if c is not pod_container]
        limits = pod_limits([*others, request], self.sandbox.config.runtime)
        host = self.sandbox.host_cgroup
        host.check(limits)
        # The host grows first (refused before the guest changes anything),
        # and shrinks once the guest has taken the new limits.
        before = host.limits
        host.resize(widest(before, limits))
        try:
            await self._agent().update_container(container_id, proto)
        except BaseException:
            with contextlib.suppress(PykataError):
                host.fit(before)
            raise
        pod_container.request = request
        host.fit(limits)

    async def stats(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        self.container(container_id).lifecycle.require("stats")
        return await self._agent().stats_container(container_id)

    async def pids(self, container_id: str) -> list[int]:
        """The container's processes' pids, as the guest numbers them."""
        self.container(container_id)
        return await self._agent().list_processes(container_id)

    async def resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        proc = self.process(container_id, exec_id)
        if not proc.terminal:
            raise InvalidStateError(f"process {proc.label} has no terminal")
        if proc.lifecycle.stopped:
            return
        await self._agent().resize(container_id, proc.agent_exec_id, rows, columns)

    async def close_input(self, container_id: str, exec_id: str = "") -> None:
        """The client sends no more input: what it already sent still reaches
        the process (for a while), then its stdin is closed."""
        proc = self.process(container_id, exec_id)
        drained = proc.relay is not None and await proc.relay.finish_input(CLOSE_INPUT_GRACE)
        if proc.io is not None:
            proc.io.close_stdin()
        if not drained and not proc.lifecycle.stopped:
            with contextlib.suppress(AgentError):
                await self._agent().close_stdin(container_id, proc.agent_exec_id)

    async def delete_process(self, container_id: str, exec_id: str) -> PodProcess:
        """Forget an exec'd process that exited (or never started)."""
        pod_container = self.container(container_id)
        proc = pod_container.process(exec_id)
        proc.lifecycle.require("delete")
        del pod_container.execs[exec_id]
        await proc.discard()
        return proc

    async def delete_container(self, container_id: str) -> PodProcess:
        """Remove a created or stopped container, in the guest and on the
        host; the last one takes the pod along unless it ends with its init.
        Returns its init (its exit status, when it ran)."""
        async with self._lock:
            pod_container = self.container(container_id)
            pod_container.lifecycle.require("delete")
            with tracing.span("container.delete", self.trace,
                              **{"pykata.container": container_id}):
                await self._remove(pod_container)
            self._save()
            self._emit(PodEvent("deleted", container_id,
                                exit_status=pod_container.init.exit_status,
                                exited_at=pod_container.init.exited_at))
            if not self.containers and not self.policy.ends_with_init:
                await self._stop()
        return pod_container.init

    async def _remove(self, pod_container: PodContainer) -> None:
        for proc in pod_container.processes():
            await proc.discard()
        await pod_container.container.delete()
        self.containers.pop(pod_container.id, None)
        if not self._stopping:
            self._shrink_host(list(self.containers.values()))
        log.info("container %s deleted", pod_container.id,
                 extra={"container": pod_container.id})

    def _resize_host(self, containers: Sequence[PodContainer]) -> None:
        """The pod's host limits for its live containers (an exited one, an
        init container or a restarted one's old self, asks for nothing more,
        as the kubelet counts); unchanged when none is live."""
        live = _live(containers)
        if not live and containers:
            return
        limits = pod_limits([c.request for c in live] or
                            [self.sandbox.options.cgroup_request], self.sandbox.config.runtime)
        self.sandbox.host_cgroup.fit(limits)

    def _shrink_host(self, containers: Sequence[PodContainer]) -> None:
        # Memory the pod still uses cannot be taken back at once: the
        # larger limit stays, and says why in the log.
        try:
            self._resize_host(containers)
        except PykataError as exc:
            log.warning("pod %s keeps its host limits: %s", self.id, exc)

    # --- watching the guest -----------------------------------------------------

    async def _watch_process(self, proc: PodProcess, container: Container) -> None:
        try:
            code = await container.wait(proc.agent_exec_id)
        except PykataError as exc:
            # A lost connection is most often a VM that died, which the VM's
            # watcher reports with its cause; anything else is said here.
            if not self._stopping and await self.sandbox.explain(exc) is exc:
                log.error("waiting for %s: %s", proc.label, exc,
                          extra={"container": proc.container_id})
            code = VM_DIED_STATUS
        await self._exited(proc, code)

    async def _exited(self, proc: PodProcess, code: int) -> None:
        # Shielded: the recording of an exit outlives its watcher's
        # cancellation (a pod stopping), or its waiters would never wake.
        await asyncio.shield(proc.finish(code, self._announce_exit))

    def _announce_exit(self, proc: PodProcess) -> None:
        """A process's exit is recorded: saved and told before its waiters wake."""
        self._save()
        self._emit(PodEvent("exited", proc.container_id, proc.exec_id,
                            exit_status=proc.exit_status, exited_at=proc.exited_at))
        if not proc.exec_id and self.sandbox.share.scratch_full():
            log.warning(
                "container %s's writable layer reached its limit of %d MiB: its writes "
                "failed with 'No space left on device' (raise [runtime] scratch_size in %s)",
                proc.container_id, self.sandbox.config.runtime.scratch_size,
                self.sandbox.config.source)
        if not proc.exec_id and not self._stopping:
            self._shrink_host(list(self.containers.values()))
        if self.policy.ends_with_init and not proc.exec_id:
            self.ended.set()

    async def _watch_vm(self) -> None:
        vm = self.sandbox.vm
        assert vm is not None
        status = await vm.wait()
        if self._stopping:
            self.events.add("vm", f"the VM exited (status {status}) as the pod stopped")
            return
        self.events.add("vm", f"the VM stopped unexpectedly (status {status})", error=True)
        note = self.sandbox.host_cgroup.death_note()
        log.error("the VM of pod %s stopped unexpectedly:\n%s%s", self.id,
                  vm.failure_report(), f"\n{note}" if note else "",
                  extra={"sandbox": self.id})
        for pod_container in list(self.containers.values()):
            for proc in pod_container.processes():
                # An init counts even before its start: Wait must learn of it.
                started = proc.status is not Status.CREATED or proc is pod_container.init
                if started and not proc.finishing:
                    await self._exited(proc, VM_DIED_STATUS)
        if self.policy.ends_with_init:
            self.ended.set()

    async def _watch_oom(self) -> None:
        """An "oom" event for each container the guest reports, at most one
        per container per OOM_INTERVAL seconds and at most
        OOM_POLLS_PER_SECOND polls: a guest that reports without end costs
        the host little."""
        agent = self._agent()
        loop = asyncio.get_running_loop()
        last: dict[str, float] = {}
        while not self.lifecycle.stopped:
            try:
                container_id = await agent.get_oom_event()
            except AgentError as exc:
                if agent.closed:
                    return
                log.warning("OOM events: %s", exc, extra={"sandbox": self.id})
                await asyncio.sleep(1.0)
                continue
            stamp = loop.time()
            if container_id in self.containers and \
                    stamp - last.get(container_id, -OOM_INTERVAL) >= OOM_INTERVAL:
                last[container_id] = stamp
                self._emit(PodEvent("oom", container_id))
            await asyncio.sleep(1 / OOM_POLLS_PER_SECOND)

    # --- helpers -------------------------------------------------------------

    def _agent(self) -> AgentClient:
        self.lifecycle.require("use")
        agent = self.sandbox.agent
        if agent is None:
            raise InvalidStateError(f"pod {self.id} has no agent connection")
        return agent

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _emit(self, event: PodEvent) -> None:
        self.events.add(*describe_pod_event(event))
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("handling pod event %s", event.kind)

    def _save(self) -> None:
        """Rewrite the sandbox's saved state with the pod's statuses. The pod
        in memory is what its owner acts on: a save that fails (/run full) is
        logged, and the pod goes on (an exit is still told its waiters)."""
        try:
            self._record()
        except OSError as exc:
            log.error("saving the state of pod %s: %s", self.id, exc)

    def _record(self) -> None:
        self.sandbox.record_pod(self.lifecycle.status.value, {
            cid: {"": c.init.status.value,
                  **{eid: p.status.value for eid, p in c.execs.items()}}
            for cid, c in self.containers.items()})


def _shares_pid_namespace(spec: dict[str, Any]) -> bool:
    """A pod container asks for the pod's PID namespace by naming one (CRI does)."""
    annotations = spec.get("annotations") or {}
    if annotations.get(CONTAINER_TYPE_KEY) != "container":
        return False
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "pid" and ns.get("path"):
            return True
    return False


def parse_json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object a client sent (a process, resources), or SpecError."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise SpecError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{what} must be a JSON object")
    return data


def _live(containers: Iterable[PodContainer]) -> list[PodContainer]:
    """The containers whose init has not exited."""
    return [c for c in containers if c.init.status is not Status.STOPPED]
