"""containerd's task service (`containerd.task.v2.Task`) over one pod's sandbox.

The first Create boots the pod's VM; each task is a container in it; the VM
stops when the last task is deleted. Every method delegates to the runtime
library (Sandbox, Container) and reports through the event publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata import __version__
from pykata.channels import CONTAINER_TYPE_KEY
from pykata.config import Config
from pykata.errors import AgentError, PykataError, SpecError
from pykata.protocols import events_pb2, mount_pb2, shim_pb2, task_types_pb2
from pykata.protocols.oci_spec import InvalidSpecError, process_from_json, resources_from_json
from pykata.runtime.container import Container, bind_rootfs, spec_readonly_root
from pykata.runtime.keys import pod_key
from pykata.runtime.lifecycle import VM_DIED_STATUS, Status
from pykata.runtime.monitored import MonitoredSandbox
from pykata.runtime.mount_points import spec_mount_points
from pykata.runtime.mounts import Mount, mount_beneath, unmount_all
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.spec import load_bundle, network_namespace_path, spec_hostname
from pykata.runtime.volumes import plan_volumes
from pykata.shim.annotations import sandbox_options
from pykata.shim.events import EventPublisher
from pykata.shim.metrics import pack_metrics, to_v2_metrics
from pykata.shim.options import pod_config
from pykata.shim.start import group_of
from pykata.shim.status import not_found, precondition, rpc
from pykata.shim.tasks import ShimProcess, Task
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

_EMPTY = empty_pb2.Empty()
# How long CloseIO lets input already in the stdin FIFO flow to the process.
CLOSE_IO_GRACE = 10.0
# OOM events from the guest: one TaskOOM per container per interval, and a
# bounded rate of polls however fast the guest answers.
OOM_INTERVAL = 1.0
OOM_POLLS_PER_SECOND = 100


class TaskService:
    def __init__(self, config: Config, publisher: EventPublisher, on_idle: Callable[[], None],
                 pod: tuple[str, str] = ("", "")):
        """`pod` is containerd's (address, namespace): with the pod's id they
        key its state on the host."""
        self.config = config
        self._pod = pod
        self.publisher = publisher
        self._on_idle = on_idle
        self.sandbox: Sandbox | None = None
        self.tasks: dict[str, Task] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # --- helpers ------------------------------------------------------------

    @property
    def vm_pid(self) -> int:
        vm = self.sandbox.vm if self.sandbox else None
        return (vm.pid or 0) if vm else 0

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise not_found(f"task {task_id}")
        return task

    def _process(self, task_id: str, exec_id: str) -> ShimProcess:
        task = self._task(task_id)
        proc = task.execs.get(exec_id) if exec_id else task.init
        if proc is None:
            raise not_found(f"process {exec_id} of task {task_id}")
        return proc

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- Create ---------------------------------------------------------------

    @rpc
    async def Create(
        self, req: shim_pb2.CreateTaskRequest, ctx: object
    ) -> shim_pb2.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise StatusError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported")
        async with self._lock:
            if req.id in self.tasks:
                raise StatusError(Code.ALREADY_EXISTS, f"task {req.id} already exists")
            spec, root = load_bundle(Path(req.bundle))
            if self.sandbox is None:
                self.config = pod_config(req.options, self.config)
            annotations = spec.get("annotations") or {}
            options = sandbox_options(annotations, self.config)
            proc_stdio = (req.stdin, req.stdout, req.stderr)
            task = await self._create(req, spec, root, options, proc_stdio)
        rootfs = [mount_pb2.Mount(type=m.type, source=m.source, target=m.target,
                                  options=list(m.options)) for m in req.rootfs]
        self.publisher.publish(events_pb2.TaskCreate(
            container_id=task.id, bundle=req.bundle, rootfs=rootfs, pid=self.vm_pid,
            io=events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                                 terminal=req.terminal),
        ))
        return shim_pb2.CreateTaskResponse(pid=self.vm_pid)

    async def _create(
        self, req: shim_pb2.CreateTaskRequest, spec: dict[str, Any], root: Path,
        options: Any, stdio: tuple[str, str, str],
    ) -> Task:
        """Mount, boot (first task), share, create in the guest; undo all on failure.

        With snapshot mounts the rootfs is mounted at the bundle's rootfs/;
        without, the spec's root.path is shared as it is.
        """
        booted_here = False
        bundle_rootfs = Path(req.bundle) / "rootfs"
        annotations = spec.get("annotations") or {}
        task: Task | None = None
        try:
            # Checked before a VM boots: a missing host path should not cost a boot.
            volumes = plan_volumes(spec.get("mounts") or [], Path(req.bundle))
            if self.sandbox is None:
                group = group_of(req.bundle, req.id)
                # The first task's network namespace (CRI's pod namespace,
                # `ctr run --with-ns network:PATH`) serves the whole pod.
                options = dataclasses.replace(options, netns=network_namespace_path(spec),
                                              hostname=spec_hostname(spec, options.hostname))
                self.sandbox = MonitoredSandbox(group, self.config, options,
                                                key=pod_key(*self._pod, group))
                booted_here = True
            task = Task(Container(self.sandbox, req.id), req.bundle)
            task.init = ShimProcess(task, "", terminal=req.terminal, stdin=stdio[0],
                                    stdout=stdio[1], stderr=stdio[2])
            self._mount_rootfs(task, req, bundle_rootfs)
            if booted_here:
                await self.sandbox.start()
                self._spawn(self._watch_vm(self.sandbox))
                self._spawn(self._watch_oom(self.sandbox))
            task.container.share_rootfs(bind_rootfs(bundle_rootfs if req.rootfs else root),
                                        readonly=spec_readonly_root(spec),
                                        mount_points=spec_mount_points(spec))
            share_pid = _shares_pid_namespace(spec, annotations)
            spec.setdefault("process", {})["terminal"] = req.terminal
            try:
                await task.container.create(spec, share_pid_ns=share_pid, volumes=volumes)
            except AgentError as exc:
                raise await self.sandbox.explain(exc) from exc
            assert self.sandbox.agent is not None
            task.init.start_relay(self.sandbox.agent)
            # Watched from creation on: a task killed before it was started
            # must still report its exit to Wait.
            self._spawn(self._watch_process(task.init))
        except BaseException:
            await self._undo_create(task, bundle_rootfs, booted_here)
            raise
        self.tasks[task.id] = task
        log.info("task %s created", task.id, extra={"container": task.id})
        return task

    def _mount_rootfs(self, task: Task, req: shim_pb2.CreateTaskRequest, target: Path) -> None:
        """containerd's snapshot mounts, at the bundle's rootfs/ (its contract)."""
        if not req.rootfs:
            return
        target.mkdir(exist_ok=True)
        for m in req.rootfs:
            mount_beneath(Mount(m.type, m.source, tuple(m.options)), target.parent, target.name)
            task.rootfs_mounted = True

    async def _undo_create(self, task: Task | None, bundle_rootfs: Path, booted: bool) -> None:
        if task is not None:
            with contextlib.suppress(PykataError):
                await task.container.delete()
            if task.init is not None:
                await task.init.discard()
            if task.rootfs_mounted:
                with contextlib.suppress(PykataError):
                    unmount_all(bundle_rootfs)
        if booted and self.sandbox is not None:
            await self._stop_sandbox()

    # --- Start, Wait, Kill ------------------------------------------------------

    @rpc
    async def Start(self, req: shim_pb2.StartRequest, ctx: object) -> shim_pb2.StartResponse:
        proc = self._process(req.id, req.exec_id)
        proc.lifecycle.require("start")
        task = proc.task
        assert self.sandbox is not None and self.sandbox.agent is not None
        try:
            if req.exec_id:
                assert proc.spec is not None
                await task.container.exec(req.exec_id, proc.spec)
                proc.start_relay(self.sandbox.agent)
            else:
                await task.container.start()
        except AgentError as exc:
            raise await self.sandbox.explain(exc) from exc
        proc.lifecycle.move(Status.RUNNING)
        if req.exec_id:
            self._spawn(self._watch_process(proc))
            self.publisher.publish(events_pb2.TaskExecStarted(
                container_id=task.id, exec_id=req.exec_id, pid=self.vm_pid))
        else:
            self.publisher.publish(events_pb2.TaskStart(container_id=task.id, pid=self.vm_pid))
        return shim_pb2.StartResponse(pid=self.vm_pid)

    async def _watch_process(self, proc: ShimProcess) -> None:
        try:
            code = await proc.task.container.wait(proc.agent_exec_id)
        except PykataError as exc:
            log.error("waiting for %s: %s", proc.label, exc, extra={"container": proc.task.id})
            code = VM_DIED_STATUS
        await self._exited(proc, code)

    async def _exited(self, proc: ShimProcess, code: int) -> None:
        first = not proc.finishing
        await proc.finish(code)
        if first:
            self.publisher.publish(events_pb2.TaskExit(
                container_id=proc.task.id, id=proc.exec_id or proc.task.id, pid=self.vm_pid,
                exit_status=proc.exit_status, exited_at=proc.exited_at,
            ))

    @rpc
    async def Wait(self, req: shim_pb2.WaitRequest, ctx: object) -> shim_pb2.WaitResponse:
        proc = self._process(req.id, req.exec_id)
        await proc.exited.wait()
        return shim_pb2.WaitResponse(exit_status=proc.exit_status, exited_at=proc.exited_at)

    @rpc
    async def Kill(self, req: shim_pb2.KillRequest, ctx: object) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if proc.lifecycle.stopped:
            # containerd takes NOT_FOUND as "already exited", which it is.
            raise not_found(f"process {proc.label} (it already exited)")
        if proc.lifecycle.status is Status.CREATED and req.exec_id:
            raise precondition(f"process {proc.label} was never started")
        await proc.task.container.kill(req.signal, all_processes=req.all,
                                       exec_id=proc.agent_exec_id)
        return _EMPTY

    # --- Delete, Shutdown ---------------------------------------------------------

    @rpc
    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: object) -> shim_pb2.DeleteResponse:
        proc = self._process(req.id, req.exec_id)
        proc.lifecycle.require("delete")
        task = proc.task
        if req.exec_id:
            del task.execs[req.exec_id]
            await proc.discard()
        else:
            await self._delete_task(task)
            self.publisher.publish(events_pb2.TaskDelete(
                container_id=task.id, pid=self.vm_pid, exit_status=proc.exit_status,
                exited_at=proc.exited_at, id=task.id,
            ))
        response = shim_pb2.DeleteResponse(pid=self.vm_pid, exit_status=proc.exit_status)
        if proc.exited_at is not None:
            response.exited_at.CopyFrom(proc.exited_at)
        return response

    async def _delete_task(self, task: Task) -> None:
        async with self._lock:
            for proc in task.processes():
                await proc.discard()
            await task.container.delete()
            if task.rootfs_mounted:
                unmount_all(Path(task.bundle) / "rootfs")
                task.rootfs_mounted = False
            self.tasks.pop(task.id, None)
            log.info("task %s deleted", task.id, extra={"container": task.id})
            if not self.tasks:
                await self._stop_sandbox()

    async def _stop_sandbox(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is None:
            return
        self._stopping = True
        try:
            await sandbox.stop()
        finally:
            self._stopping = False
        log.info("sandbox %s stopped", sandbox.id, extra={"sandbox": sandbox.id})

    @rpc
    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: object) -> empty_pb2.Empty:
        if self.tasks and not req.now:
            return _EMPTY
        self._on_idle()
        return _EMPTY

    async def close(self) -> None:
        """The server is going away: end every task and the VM."""
        for task in list(self.tasks.values()):
            for proc in task.processes():
                await proc.discard()
            if task.rootfs_mounted:
                with contextlib.suppress(PykataError):
                    unmount_all(Path(task.bundle) / "rootfs")
        self.tasks.clear()
        await self._stop_sandbox()
        for background in list(self._background):
            background.cancel()

    # --- the VM ---------------------------------------------------------------

    async def _watch_vm(self, sandbox: Sandbox) -> None:
        assert sandbox.vm is not None
        await sandbox.vm.wait()
        if self._stopping or self.sandbox is not sandbox:
            return
        log.error("the VM of sandbox %s stopped unexpectedly:\n%s", sandbox.id,
                  sandbox.vm.failure_report(), extra={"sandbox": sandbox.id})
        for task in list(self.tasks.values()):
            for proc in task.processes():
                started = proc.lifecycle.status is not Status.CREATED or proc is task.init
                if started and not proc.finishing:
                    await self._exited(proc, VM_DIED_STATUS)

    async def _watch_oom(self, sandbox: Sandbox) -> None:
        """TaskOOM for each container the guest reports, at most one per
        container per OOM_INTERVAL seconds, and at most OOM_POLLS_PER_SECOND
        polls: a guest that reports without end costs the host little."""
        agent = sandbox.agent
        assert agent is not None
        loop = asyncio.get_running_loop()
        last: dict[str, float] = {}
        while self.sandbox is sandbox:
            try:
                container_id = await agent.get_oom_event()
            except AgentError as exc:
                if agent.closed:
                    return
                log.warning("OOM events: %s", exc, extra={"sandbox": sandbox.id})
                await asyncio.sleep(1.0)
                continue
            stamp = loop.time()
            if container_id in self.tasks and stamp - last.get(container_id, -OOM_INTERVAL) \
                    >= OOM_INTERVAL:
                last[container_id] = stamp
                self.publisher.publish(events_pb2.TaskOOM(container_id=container_id))
            await asyncio.sleep(1 / OOM_POLLS_PER_SECOND)

    # --- the rest of the task API ------------------------------------------------

    @rpc
    async def State(self, req: shim_pb2.StateRequest, ctx: object) -> shim_pb2.StateResponse:
        return self._process(req.id, req.exec_id).state(self.vm_pid)

    @rpc
    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: object) -> empty_pb2.Empty:
        task = self._task(req.id)
        if task.init is None:
            raise precondition(f"task {task.id} is not running")
        if task.init.lifecycle.status is not Status.PAUSED:
            task.init.lifecycle.require("exec")
        if req.exec_id in task.execs or not req.exec_id:
            raise StatusError(Code.ALREADY_EXISTS, f"process {req.exec_id!r} already exists")
        spec = _json_any(req.spec, "the exec process spec")
        try:
            process_from_json(spec)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid exec process spec: {exc}") from exc
        spec["terminal"] = req.terminal
        task.execs[req.exec_id] = ShimProcess(
            task, req.exec_id, terminal=req.terminal, stdin=req.stdin, stdout=req.stdout,
            stderr=req.stderr, spec=spec,
        )
        self.publisher.publish(events_pb2.TaskExecAdded(container_id=task.id,
                                                        exec_id=req.exec_id))
        return _EMPTY

    @rpc
    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: object) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if not proc.terminal:
            raise precondition(f"process {proc.label} has no terminal")
        await proc.task.container.agent.resize(proc.task.id, proc.agent_exec_id,
                                               req.height, req.width)
        return _EMPTY

    @rpc
    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: object) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if req.stdin:
            # The client closes its end first, then says so: what it wrote may
            # still be in the FIFO, and must reach the process before the end.
            drained = proc.relay is not None and await proc.relay.finish_input(CLOSE_IO_GRACE)
            proc.fifos.close_stdin()
            if not drained:
                with contextlib.suppress(AgentError):
                    await proc.task.container.agent.close_stdin(proc.task.id,
                                                                proc.agent_exec_id)
        return _EMPTY

    @rpc
    async def Pids(self, req: shim_pb2.PidsRequest, ctx: object) -> shim_pb2.PidsResponse:
        task = self._task(req.id)
        pids = await task.container.agent.list_processes(task.id)
        return shim_pb2.PidsResponse(
            processes=[task_types_pb2.ProcessInfo(pid=pid) for pid in pids])

    @rpc
    async def Pause(self, req: shim_pb2.PauseRequest, ctx: object) -> empty_pb2.Empty:
        task = self._task(req.id)
        if task.init is not None:
            task.init.lifecycle.require("pause")
        await task.container.agent.pause_container(task.id)
        if task.init is not None:
            task.init.lifecycle.move(Status.PAUSED)
        self.publisher.publish(events_pb2.TaskPaused(container_id=task.id))
        return _EMPTY

    @rpc
    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: object) -> empty_pb2.Empty:
        task = self._task(req.id)
        if task.init is not None:
            task.init.lifecycle.require("resume")
        await task.container.agent.resume_container(task.id)
        if task.init is not None:
            task.init.lifecycle.move(Status.RUNNING)
        self.publisher.publish(events_pb2.TaskResumed(container_id=task.id))
        return _EMPTY

    @rpc
    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: object) -> Message:
        raise StatusError(Code.UNIMPLEMENTED,
                          "checkpoint is not supported by pykata (VM-based tasks)")

    @rpc
    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: object) -> empty_pb2.Empty:
        task = self._task(req.id)
        resources = _json_any(req.resources, "the resources")
        try:
            proto = resources_from_json(resources)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid resources: {exc}") from exc
        await task.container.agent.update_container(task.id, proto)
        return _EMPTY

    @rpc
    async def Stats(self, req: shim_pb2.StatsRequest, ctx: object) -> shim_pb2.StatsResponse:
        task = self._task(req.id)
        stats = await task.container.agent.stats_container(task.id)
        return shim_pb2.StatsResponse(stats=pack_metrics(to_v2_metrics(stats)))

    @rpc
    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: object) -> shim_pb2.ConnectResponse:
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=self.vm_pid,
                                        version=__version__)


def _json_any(value: Any, what: str) -> dict[str, Any]:
    """containerd sends OCI objects as an Any whose value is their JSON."""
    try:
        data = json.loads(value.value or b"{}")
    except ValueError as exc:
        raise SpecError(f"{what} is not valid JSON ({value.type_url})") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{what} must be a JSON object ({value.type_url})")
    return data


def _shares_pid_namespace(spec: dict[str, Any], annotations: dict[str, str]) -> bool:
    """A pod container asks for the pod's PID namespace by naming one (CRI does)."""
    if annotations.get(CONTAINER_TYPE_KEY) != "container":
        return False
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "pid" and ns.get("path"):
            return True
    return False


TASK_REQUESTS: dict[str, type[Message]] = {
    "State": shim_pb2.StateRequest,
    "Create": shim_pb2.CreateTaskRequest,
    "Start": shim_pb2.StartRequest,
    "Delete": shim_pb2.DeleteRequest,
    "Pids": shim_pb2.PidsRequest,
    "Pause": shim_pb2.PauseRequest,
    "Resume": shim_pb2.ResumeRequest,
    "Checkpoint": shim_pb2.CheckpointTaskRequest,
    "Kill": shim_pb2.KillRequest,
    "Exec": shim_pb2.ExecProcessRequest,
    "ResizePty": shim_pb2.ResizePtyRequest,
    "CloseIO": shim_pb2.CloseIORequest,
    "Update": shim_pb2.UpdateTaskRequest,
    "Wait": shim_pb2.WaitRequest,
    "Stats": shim_pb2.StatsRequest,
    "Connect": shim_pb2.ConnectRequest,
    "Shutdown": shim_pb2.ShutdownRequest,
}
