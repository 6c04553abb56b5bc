"""containerd's task service (`containerd.task.v2.Task`) over one pod.

The shim is the pod's owner: the `Pod` (its VM, containers, processes) lives
in this process. The first Create boots it; each task is a container in it;
it ends when its last task is deleted. Every method translates containerd's
request into the pod's terms and the pod's events into containerd's: the
rules (what may start, what is deleted when) are the pod's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from pykata import __version__
from pykata.config import Config
from pykata.errors import NotFoundError, PykataError
from pykata.host.mounts import Mount, mount_beneath, unmount_all
from pykata.protocols import events_pb2, mount_pb2, shim_pb2, task_types_pb2
from pykata.runtime.container import bind_rootfs
from pykata.runtime.keys import pod_key
from pykata.runtime.lifecycle import Status
from pykata.runtime.owner import OwnedPod, new_pod, start_pod
from pykata.runtime.pod import Pod, PodEvent, PodPolicy, parse_json_object
from pykata.runtime.pod_options import pod_options
from pykata.runtime.process import PodProcess
from pykata.runtime.spec import load_bundle
from pykata.runtime.volumes import plan_volumes
from pykata.shim.events import EventPublisher
from pykata.shim.fifo import ProcessFifos
from pykata.shim.metrics import pack_metrics, to_v2_metrics
from pykata.shim.options import pod_config
from pykata.shim.start import group_of
from pykata.shim.status import rpc
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

_EMPTY = empty_pb2.Empty()

# containerd's names for the lifecycle's states.
TASK_STATUS = {
    Status.CREATING: task_types_pb2.UNKNOWN,
    Status.CREATED: task_types_pb2.CREATED,
    Status.RUNNING: task_types_pb2.RUNNING,
    Status.PAUSED: task_types_pb2.PAUSED,
    Status.STOPPED: task_types_pb2.STOPPED,
}


class FifoIO:
    """A process's stdio FIFOs, as the pod relays them (`ProcessIO`)."""

    def __init__(self, stdin: str, stdout: str, stderr: str) -> None:
        self.fifos = ProcessFifos(stdin, stdout, stderr)
        self._closed = False

    @property
    def stdout(self) -> Any:
        return self.fifos.stdout.write if self.fifos.stdout else None

    @property
    def stderr(self) -> Any:
        return self.fifos.stderr.write if self.fifos.stderr else None

    @property
    def stdin(self) -> Any:
        return self.fifos.stdin.read if self.fifos.stdin else None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.fifos.close()

    def close_stdin(self) -> None:
        if not self._closed:
            self.fifos.close_stdin()


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class TaskService:
    def __init__(self, config: Config, publisher: EventPublisher, on_idle: Callable[[], None],
                 pod: tuple[str, str] = ("", "")):
        """`pod` is containerd's (address, namespace): with the pod's id they
        key its state on the host."""
        self.config = config
        self._pod_ident = pod
        self.publisher = publisher
        self._on_idle = on_idle
        self.owned: OwnedPod | None = None
        # Tasks whose rootfs this shim mounted at the bundle's rootfs/.
        self._mounted: dict[str, Path] = {}
        self._lock = asyncio.Lock()

    # --- helpers ------------------------------------------------------------

    @property
    def pod(self) -> Pod | None:
        return self.owned.pod if self.owned is not None else None

    @property
    def vm_pid(self) -> int:
        return self.pod.vm_pid if self.pod is not None else 0

    def _the_pod(self, task_id: str) -> Pod:
        if self.pod is None:
            raise NotFoundError(f"task {task_id} does not exist")
        return self.pod

    def _process(self, task_id: str, exec_id: str) -> PodProcess:
        return self._the_pod(task_id).process(task_id, exec_id)

    def _on_pod_event(self, event: PodEvent) -> None:
        """The pod's events, as containerd's."""
        pid = self.vm_pid
        cid, eid = event.container_id, event.exec_id
        message: Message | None = None
        if event.kind == "started":
            message = events_pb2.TaskStart(container_id=cid, pid=pid)
        elif event.kind == "exec-added":
            message = events_pb2.TaskExecAdded(container_id=cid, exec_id=eid)
        elif event.kind == "exec-started":
            message = events_pb2.TaskExecStarted(container_id=cid, exec_id=eid, pid=pid)
        elif event.kind == "exited":
            message = events_pb2.TaskExit(container_id=cid, id=eid or cid, pid=pid,
                                          exit_status=event.exit_status,
                                          exited_at=_timestamp(event.exited_at))
        elif event.kind == "deleted":
            message = events_pb2.TaskDelete(container_id=cid, id=cid, pid=pid,
                                            exit_status=event.exit_status,
                                            exited_at=_timestamp(event.exited_at))
        elif event.kind == "paused":
            message = events_pb2.TaskPaused(container_id=cid)
        elif event.kind == "resumed":
            message = events_pb2.TaskResumed(container_id=cid)
        elif event.kind == "oom":
            message = events_pb2.TaskOOM(container_id=cid)
        if message is not None:
            self.publisher.publish(message)

    # --- Create ---------------------------------------------------------------

    @rpc
    async def Create(
        self, req: shim_pb2.CreateTaskRequest, ctx: object
    ) -> shim_pb2.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise StatusError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported")
        async with self._lock:
            if self.pod is not None and req.id in self.pod.containers:
                raise StatusError(Code.ALREADY_EXISTS, f"task {req.id} already exists")
            await self._create(req)
        rootfs = [mount_pb2.Mount(type=m.type, source=m.source, target=m.target,
                                  options=list(m.options)) for m in req.rootfs]
        self.publisher.publish(events_pb2.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=rootfs, pid=self.vm_pid,
            io=events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                                 terminal=req.terminal),
        ))
        return shim_pb2.CreateTaskResponse(pid=self.vm_pid)

    async def _create(self, req: shim_pb2.CreateTaskRequest) -> None:
        """Check, mount, boot (first task), create in the pod; undo all on failure.

        With snapshot mounts the rootfs is mounted at the bundle's rootfs/;
        without, the spec's root.path is shared as it is."""
        spec, root = load_bundle(Path(req.bundle))
        config = pod_config(req.options, self.config) if self.pod is None else self.config
        # Checked for every task, before a VM boots: annotations and volumes.
        options = pod_options(spec, config)
        volumes = plan_volumes(spec.get("mounts") or [], Path(req.bundle))
        spec.setdefault("process", {})["terminal"] = req.terminal
        bundle_rootfs = Path(req.bundle) / "rootfs"
        io = FifoIO(req.stdin, req.stdout, req.stderr)
        booted_here = False
        try:
            self._mount_rootfs(req, bundle_rootfs)
            if self.owned is None:
                # The first task's network namespace (CRI's pod namespace,
                # `ctr run --with-ns network:PATH`) serves the whole pod.
                group = group_of(req.bundle, req.id)
                from pykata.factory.sources import vm_source

                self.config = config
                pod = new_pod(group, config, options, key=pod_key(*self._pod_ident, group),
                              front_end="shim", source=vm_source(config, use_cache=True),
                              policy=PodPolicy(), on_event=self._on_pod_event)
                booted_here = True
                self.owned = await start_pod(pod)
            rootfs_mounts = bind_rootfs(bundle_rootfs if req.rootfs else root)
            await self.owned.pod.create_container(
                req.id, spec, lambda _c: rootfs_mounts, io=io, volumes=volumes,
                bundle=req.bundle, stdio_paths=(req.stdin, req.stdout, req.stderr))
        except BaseException:
            with contextlib.suppress(Exception):
                await io.close()
            self._unmount_rootfs(req.id)
            if booted_here:
                await self._end_pod()
            raise
        log.info("task %s created", req.id, extra={"container": req.id})

    def _mount_rootfs(self, req: shim_pb2.CreateTaskRequest, target: Path) -> None:
        """containerd's snapshot mounts, at the bundle's rootfs/ (its contract)."""
        if not req.rootfs:
            return
        target.mkdir(exist_ok=True)
        for m in req.rootfs:
            mount_beneath(Mount(m.type, m.source, tuple(m.options)), target.parent, target.name)
            self._mounted[req.id] = target

    def _unmount_rootfs(self, task_id: str) -> None:
        target = self._mounted.pop(task_id, None)
        if target is not None:
            with contextlib.suppress(PykataError):
                unmount_all(target)

    async def _end_pod(self) -> None:
        owned, self.owned = self.owned, None
        if owned is not None:
            await owned.close()
            log.info("sandbox %s stopped", owned.pod.id, extra={"sandbox": owned.pod.id})

    # --- Start, Wait, Kill ------------------------------------------------------

    @rpc
    async def Start(self, req: shim_pb2.StartRequest, ctx: object) -> shim_pb2.StartResponse:
        await self._the_pod(req.id).start_process(req.id, req.exec_id)
        return shim_pb2.StartResponse(pid=self.vm_pid)

    @rpc
    async def Wait(self, req: shim_pb2.WaitRequest, ctx: object) -> shim_pb2.WaitResponse:
        proc = self._process(req.id, req.exec_id)
        await proc.exited.wait()
        return shim_pb2.WaitResponse(exit_status=proc.exit_status,
                                     exited_at=_timestamp(proc.exited_at))

    @rpc
    async def Kill(self, req: shim_pb2.KillRequest, ctx: object) -> empty_pb2.Empty:
        await self._the_pod(req.id).kill(req.id, req.exec_id, req.signal, all_processes=req.all)
        return _EMPTY

    # --- Delete, Shutdown ---------------------------------------------------------

    @rpc
    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: object) -> shim_pb2.DeleteResponse:
        pod = self._the_pod(req.id)
        if req.exec_id:
            proc = await pod.delete_process(req.id, req.exec_id)
        else:
            async with self._lock:
                proc = await pod.delete_container(req.id)
                self._unmount_rootfs(req.id)
                if pod.lifecycle.stopped:
                    await self._end_pod()
            log.info("task %s deleted", req.id, extra={"container": req.id})
        return shim_pb2.DeleteResponse(pid=self.vm_pid, exit_status=proc.exit_status,
                                       exited_at=_timestamp(proc.exited_at))

    @rpc
    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: object) -> empty_pb2.Empty:
        if self.pod is not None and self.pod.containers and not req.now:
            return _EMPTY
        self._on_idle()
        return _EMPTY

    async def close(self) -> None:
        """The server is going away: end every task and the VM."""
        for task_id in list(self._mounted):
            if self.pod is not None and task_id in self.pod.containers:
                for proc in self.pod.containers[task_id].processes():
                    await proc.discard()
        await self._end_pod()
        for task_id in list(self._mounted):
            self._unmount_rootfs(task_id)

    # --- the rest of the task API ------------------------------------------------

    @rpc
    async def State(self, req: shim_pb2.StateRequest, ctx: object) -> shim_pb2.StateResponse:
        proc = self._process(req.id, req.exec_id)
        stdin, stdout, stderr = proc.stdio_paths
        return shim_pb2.StateResponse(
            id=req.id, bundle=self._the_pod(req.id).container(req.id).bundle,
            pid=self.vm_pid, status=TASK_STATUS[proc.status], stdin=stdin, stdout=stdout,
            stderr=stderr, terminal=proc.terminal, exit_status=proc.exit_status,
            exec_id=proc.exec_id, exited_at=_timestamp(proc.exited_at))

    @rpc
    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: object) -> empty_pb2.Empty:
        pod = self._the_pod(req.id)
        spec = parse_json_object(req.spec.value, "the exec process spec")
        spec["terminal"] = req.terminal
        io = FifoIO(req.stdin, req.stdout, req.stderr)
        try:
            await pod.add_exec(req.id, req.exec_id, spec, io=io,
                               stdio_paths=(req.stdin, req.stdout, req.stderr))
        except BaseException:
            await io.close()
            raise
        return _EMPTY

    @rpc
    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: object) -> empty_pb2.Empty:
        await self._the_pod(req.id).resize(req.id, req.exec_id, req.height, req.width)
        return _EMPTY

    @rpc
    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: object) -> empty_pb2.Empty:
        if req.stdin:
            # The client closes its end first, then says so: what it wrote may
            # still be in the FIFO, and must reach the process before the end.
            await self._the_pod(req.id).close_input(req.id, req.exec_id)
        return _EMPTY

    @rpc
    async def Pids(self, req: shim_pb2.PidsRequest, ctx: object) -> shim_pb2.PidsResponse:
        pids = await self._the_pod(req.id).pids(req.id)
        return shim_pb2.PidsResponse(
            processes=[task_types_pb2.ProcessInfo(pid=pid) for pid in pids])

    @rpc
    async def Pause(self, req: shim_pb2.PauseRequest, ctx: object) -> empty_pb2.Empty:
        await self._the_pod(req.id).pause(req.id)
        return _EMPTY

    @rpc
    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: object) -> empty_pb2.Empty:
        await self._the_pod(req.id).resume(req.id)
        return _EMPTY

    @rpc
    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: object) -> Message:
        raise StatusError(Code.UNIMPLEMENTED,
                          "checkpoint is not supported by pykata (VM-based tasks)")

    @rpc
    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: object) -> empty_pb2.Empty:
        resources = parse_json_object(req.resources.value, "the resources")
        await self._the_pod(req.id).update(req.id, resources)
        return _EMPTY

    @rpc
    async def Stats(self, req: shim_pb2.StatsRequest, ctx: object) -> shim_pb2.StatsResponse:
        stats = await self._the_pod(req.id).stats(req.id)
        return shim_pb2.StatsResponse(stats=pack_metrics(to_v2_metrics(stats)))

    @rpc
    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: object) -> shim_pb2.ConnectResponse:
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=self.vm_pid,
                                        version=__version__)


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
