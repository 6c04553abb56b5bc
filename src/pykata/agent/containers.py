"""The guest's containers: created by crun from the host's OCI spec.

A container's init process and its exec'd processes are `Process` objects
keyed by exec id. The init's exec id is the one the host chose in
CreateContainer (the container id when it chose none); an empty exec id in
SignalProcess addresses every process of the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata.agent.process import Process, Stdio
from pykata.agent.reaper import Reaper
from pykata.agent.storage import mount_storage, unmount
from pykata.channels import CONTAINER_TYPE_KEY, DEBUG_CONSOLE_ID
from pykata.protocols import agent_pb2, oci_pb2
from pykata.ttrpc import Code, StatusError

if TYPE_CHECKING:
    from pykata.agent.crun import Crun
    from pykata.agent.debug_console import DebugConsole

# What only a container needs is imported at its first use, not at boot: the
# agent answers the host sooner, and `warmup` imports these while the host
# prepares the first container. The debug console is not among them: only a
# pod that enables it imports it. Everything they check is checked as before.
DEFERRED_MODULES = (
    "json",
    "shutil",
    "pykata.agent.guest_spec",
    "pykata.agent.process_attrs",
    "pykata.agent.console",
    "pykata.agent.crun",
    "pykata.agent.sysctls",
    "pykata.protocols.oci_spec",
    "pykata.agent.stats",
)

log = logging.getLogger(__name__)

STATE_ROOT = Path("/run/pykata/containers")
# Where the host's pod volumes appear in the guest (runtime.share): one mount
# of each host path, bound by every container of the pod that binds it.
POD_VOLUMES = "/run/pykata/shared/volumes/"
CONSOLE_DIR = Path("/run/pykata/consoles")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
# How long an exec'd process's output may keep flowing after it exited before
# the agent lets go of it (a background child can hold the pipe open forever).
_EXEC_DRAIN_SECONDS = 10.0


def check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise StatusError(Code.INVALID_ARGUMENT, f"invalid {kind} {value!r}")
    return value


class Container:
    def __init__(self, container_id: str, init_exec_id: str, bundle: Path) -> None:
        self.id = container_id
        self.init_exec_id = init_exec_id
        self.bundle = bundle
        self.status = "creating"
        self.is_sandbox = False
        self.processes: dict[str, Process] = {}
        self.mounts: list[Path] = []
        # runtime-spec 1.1.0's memory.checkBeforeUpdate, from its spec.
        self.check_memory_before_update = False

    @property
    def init(self) -> Process:
        return self.processes[self.init_exec_id]


class Containers:
    def __init__(self, reaper: Reaper, state_root: Path = STATE_ROOT) -> None:
        self._reaper = reaper
        self._root = state_root
        self._containers: dict[str, Container] = {}
        self._lock = asyncio.Lock()

    @functools.cached_property
    def _crun(self) -> Crun:
        from pykata.agent.crun import Crun

        return Crun(self._reaper, self._root)

    @functools.cached_property
    def console(self) -> DebugConsole:
        """The debug console's processes: DEBUG_CONSOLE_ID in the process calls."""
        from pykata.agent.debug_console import DebugConsole

        return DebugConsole(self._reaper)

    # --- lookup ---------------------------------------------------------

    def get(self, container_id: str) -> Container:
        container = self._containers.get(container_id)
        if container is None:
            raise StatusError(Code.NOT_FOUND, f"container {container_id!r} does not exist")
        return container

    def process(self, container_id: str, exec_id: str) -> Process:
        if container_id == DEBUG_CONSOLE_ID:
            return self.console.process(exec_id)
        container = self.get(container_id)
        key = exec_id or container.init_exec_id
        if key == container.id:
            key = container.init_exec_id
        proc = container.processes.get(key)
        if proc is None:
            raise StatusError(
                Code.NOT_FOUND, f"process {exec_id!r} of container {container_id!r} does not exist"
            )
        return proc

    def all(self) -> list[Container]:
        return list(self._containers.values())

    def _sandbox_pid(self) -> int | None:
        for container in self._containers.values():
            if container.is_sandbox and container.status != "stopped":
                return container.init.pid
        return None

    # --- lifecycle ------------------------------------------------------

    async def create(self, req: agent_pb2.CreateContainerRequest) -> None:
        cid = check_id("container id", req.container_id)
        exec_id = check_id("exec id", req.exec_id) if req.exec_id else cid
        if not req.HasField("OCI") or not req.OCI.HasField("Process"):
            raise StatusError(
                Code.INVALID_ARGUMENT, "CreateContainer needs an OCI spec with a process"
            )
        async with self._lock:
            if cid in self._containers:
                raise StatusError(Code.ALREADY_EXISTS, f"container {cid!r} already exists")
            container = Container(cid, exec_id, self._root / cid)
            self._containers[cid] = container
        try:
            await self._create(container, req)
        except BaseException:
            await self._discard(container)
            raise
        container.status = "created"

    async def _create(self, container: Container, req: agent_pb2.CreateContainerRequest) -> None:
        from pykata.agent import guest_spec, process_attrs
        from pykata.agent.sysctls import write_sysctls
        from pykata.protocols.oci_spec import spec_to_json

        container.bundle.mkdir(parents=True, exist_ok=True)
        for storage in req.storages:
            container.mounts.append(await mount_storage(self._reaper, storage))
        spec = spec_to_json(req.OCI)
        annotations = spec.get("annotations", {})
        container.is_sandbox = annotations.get(CONTAINER_TYPE_KEY) == "sandbox"
        sandbox_pid = None if container.is_sandbox else self._sandbox_pid()
        container.check_memory_before_update = _checks_memory_before_update(spec)
        guest_spec.for_guest(
            spec, container.id, sandbox_pid=sandbox_pid, share_pid_ns=req.sandbox_pidns
        )
        attrs = process_attrs.take(spec["process"], exec_process=False)
        write_sysctls(guest_spec.take_pod_sysctls(spec))
        if spec.get("hooks"):
            hooks_log = str(self._crun.hooks_log(container.id))
            spec.setdefault("annotations", {}).update(
                {"run.oci.hooks.stdout": hooks_log, "run.oci.hooks.stderr": hooks_log})
        root = spec.get("root", {}).get("path", "")
        if not root or not os.path.isdir(root):
            raise StatusError(
                Code.FAILED_PRECONDITION,
                f"container {container.id}: rootfs {root!r} is not a directory in the guest",
            )
        reach_pod_volumes(spec)
        _write_json(container.bundle / "config.json", spec)
        terminal = bool(spec["process"].get("terminal"))
        executable = _executable(spec["process"])
        proc = await self._launch(
            container, container.init_exec_id, terminal,
            lambda stdio, console: self._crun.create(
                container.id, container.bundle, container.bundle / "init.pid", stdio, console,
                executable,
            ),
            container.bundle / "init.pid",
        )
        container.processes[container.init_exec_id] = proc
        proc.exited.add_done_callback(lambda _f: _mark_stopped(container))
        if attrs:
            # It waits for `crun start`: nothing of the container's has run.
            process_attrs.apply(proc.pid, attrs)

    async def _launch(
        self, container: Container, exec_id: str, terminal: bool, run: Any, pid_file: Path
    ) -> Process:
        """Start a process through crun with fresh stdio; return it running."""
        from pykata.agent.console import ConsoleSocket
        from pykata.agent.crun import wait_pid_file

        stdio = Stdio.for_terminal() if terminal else Stdio.pipes()
        # Not in the bundle: with 64-character ids (docker's) that path is
        # longer than a unix socket address may be.
        console = ConsoleSocket(_console_path()) if terminal else None
        proc = Process(container.id, exec_id, stdio)
        started = time.monotonic()
        try:
            if console is not None:
                master_task = asyncio.ensure_future(console.receive_master())
                try:
                    await run(stdio.child_fds, console.path)
                except BaseException:
                    # Let it end before its socket is closed below, or it
                    # fails on the closed socket with nobody to hear it.
                    master_task.cancel()
                    await asyncio.gather(master_task, return_exceptions=True)
                    raise
                stdio.attach_terminal(await master_task)
            else:
                await run(stdio.child_fds, None)
            stdio.close_child_ends()
            proc.pid = await wait_pid_file(pid_file)
            proc.exited = self._reaper.watch(proc.pid, since=started)
            await proc.open_streams()
        except BaseException:
            proc.close()
            raise
        finally:
            if console is not None:
                console.close()
        return proc

    async def start(self, container_id: str) -> None:
        container = self.get(container_id)
        if container.status != "created":
            raise StatusError(
                Code.FAILED_PRECONDITION,
                f"container {container_id} is {container.status}, not created",
            )
        await self._crun.start(container_id)
        if container.status == "created":
            container.status = "running"

    async def exec(self, req: agent_pb2.ExecProcessRequest) -> None:
        container = self.get(req.container_id)
        exec_id = check_id("exec id", req.exec_id)
        if container.status != "running":
            raise StatusError(
                Code.FAILED_PRECONDITION, f"container {container.id} is {container.status}"
            )
        if exec_id in container.processes or exec_id == container.id:
            raise StatusError(Code.ALREADY_EXISTS, f"process {exec_id!r} already exists")
        from pykata.agent import process_attrs
        from pykata.protocols.oci_spec import message_to_json

        process = message_to_json(req.process)
        attrs = process_attrs.take(process, exec_process=True)
        process_file = container.bundle / f"{exec_id}.process.json"
        pid_file = container.bundle / f"{exec_id}.pid"
        _write_json(process_file, process)
        proc = await self._launch(
            container, exec_id, bool(process.get("terminal")),
            lambda stdio, console: self._crun.exec(
                container.id, process_file, pid_file, stdio, console, _executable(process),
                attrs,
            ),
            pid_file,
        )
        container.processes[exec_id] = proc

    async def signal(self, container_id: str, exec_id: str, signum: int) -> None:
        if container_id == DEBUG_CONSOLE_ID:
            self.console.signal(exec_id, signum)
            return
        self.get(container_id)
        if not exec_id:
            await self._crun.kill(container_id, signum, all_processes=True)
            return
        proc = self.process(container_id, exec_id)
        if proc.exited.done():
            raise StatusError(Code.NOT_FOUND, f"process {exec_id!r} already exited")
        # Delivered as is, as runc does: an init (PID 1 of its namespace)
        # ignores a signal it has no handler for, and callers that want it
        # gone follow up with SIGKILL (docker stop, kubelet, pykata run).
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    async def wait(self, container_id: str, exec_id: str) -> int:
        if container_id == DEBUG_CONSOLE_ID:
            return await self.console.wait(exec_id)
        container = self.get(container_id)
        proc = self.process(container_id, exec_id)
        code = await asyncio.shield(proc.exited)
        if proc is not container.init:
            asyncio.get_running_loop().call_later(
                _EXEC_DRAIN_SECONDS, self._release_exec, container, proc
            )
        return code

    def _release_exec(self, container: Container, proc: Process) -> None:
        if container.processes.get(proc.exec_id) is proc:
            del container.processes[proc.exec_id]
            proc.close()

    async def remove(self, container_id: str) -> None:
        container = self.get(container_id)
        await self._discard(container)

    async def _discard(self, container: Container) -> None:
        """Delete everything of `container`, whatever state it is in."""
        with contextlib.suppress(StatusError):
            await self._crun.delete(container.id)
        for proc in container.processes.values():
            proc.close()
        for mount in reversed(container.mounts):
            await unmount(self._reaper, mount)
        import shutil

        shutil.rmtree(container.bundle, ignore_errors=True)
        self._containers.pop(container.id, None)

    async def pause(self, container_id: str) -> None:
        container = self.get(container_id)
        await self._crun.pause(container_id)
        container.status = "paused"

    async def resume(self, container_id: str) -> None:
        container = self.get(container_id)
        await self._crun.resume(container_id)
        container.status = "running"

    async def pids(self, container_id: str) -> list[int]:
        self.get(container_id)
        return await self._crun.pids(container_id)

    async def update(self, container_id: str, resources: oci_pb2.LinuxResources) -> None:
        from pykata.agent import guest_spec
        from pykata.protocols.oci_spec import message_to_json

        container = self.get(container_id)
        wanted = message_to_json(resources)
        memory = wanted.get("memory", {})
        if memory.get("checkBeforeUpdate", container.check_memory_before_update):
            _check_memory_limit(container, memory.get("limit"))
        path = container.bundle / "resources.json"
        _write_json(path, guest_spec.guest_resources(wanted, container.id))
        await self._crun.update(container_id, path)

    async def remove_all(self) -> None:
        if "console" in self.__dict__:  # made (and imported) at its first use
            self.console.close_all()
        for container in self.all():
            await self._discard(container)


def reach_pod_volumes(spec: dict[str, Any]) -> None:
    """Open each pod volume directory the spec binds, in the agent's own mount
    namespace, before crun copies that namespace for the container.

    Over virtio-fs each volume is a submount, which the guest kernel mounts
    when a path first crosses it, with a new superblock (new inodes) in each
    mount namespace that crosses it first. Crossed first by crun in each
    container's namespace, two containers binding one volume would get two
    inodes of each file, and their flock and fcntl locks would not meet;
    crossed here first, every container's namespace inherits the one mount.
    Errors are crun's to report (it names the mount that fails)."""
    for entry in spec.get("mounts") or []:
        source = entry.get("source") if isinstance(entry, dict) else None
        if not isinstance(source, str) or not source.startswith(POD_VOLUMES):
            continue
        with contextlib.suppress(OSError):
            os.close(os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC))


def _checks_memory_before_update(spec: dict[str, Any]) -> bool:
    resources = spec.get("linux", {}).get("resources", {})
    return resources.get("memory", {}).get("checkBeforeUpdate") is True


def _check_memory_limit(container: Container, limit: int | None) -> None:
    """runtime-spec 1.1.0: with memory.checkBeforeUpdate a new limit below the
    current use is refused (cgroup v2 would have the OOM killer enforce it)."""
    if limit is None or limit < 0:
        return
    from pykata.agent import guest_spec

    current_file = guest_spec.CGROUP_ROOT / guest_spec.CGROUP_PARENT.lstrip("/") \
        / container.id / "memory.current"
    try:
        current = int(current_file.read_text())
    except (OSError, ValueError) as exc:
        raise StatusError(Code.FAILED_PRECONDITION,
                          f"memory.checkBeforeUpdate: cannot read {current_file}: {exc}") from exc
    if limit < current:
        raise StatusError(
            Code.FAILED_PRECONDITION,
            f"linux.resources.memory.limit {limit} is below the container's current memory "
            f"use, {current} bytes, and memory.checkBeforeUpdate is set: not updated")


def _console_path() -> Path:
    CONSOLE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    return CONSOLE_DIR / f"{os.urandom(8).hex()}.sock"


def _mark_stopped(container: Container) -> None:
    container.status = "stopped"


def _executable(process: dict[str, Any]) -> str:
    args = process.get("args") or [""]
    return str(args[0])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data))
