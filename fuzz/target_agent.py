"""Target ``agent``: the guest agent's request decoding and dispatch.

The real `pykata.ttrpc.Server` with the real `AgentService` and `HealthService`
(`build_server`) serves one in-memory connection carrying what a hostile host
sends (see `fuzz._server`). The agent must answer or drop, never raise out of
the server, never hang.

Nothing an input does can reach the machine: crun and `ip` are fakes that fail
every call, storage mounts and neighbour entries are fakes, the containers'
state root and the hostname file are in the work directory, the tripwires
refuse any process, and the process is nobody by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pathlib
import shutil
from pathlib import Path
from typing import Any, cast

from fuzz._bytes import Encoder
from fuzz._harness import Harness, Target, Violation, bounded, replace
from fuzz._server import (
    DELIVER_RECORDS,
    DELIVER_SEGMENTS,
    SID_EXPLICIT,
    TAG_PAUSE,
    drive,
    hostile_records,
    methods_of,
    request_record,
)
from pykata.agent import containers as containers_mod
from pykata.agent import loopback as loopback_mod
from pykata.agent import network as network_mod
from pykata.agent import service as service_mod
from pykata.agent import storage as storage_mod
from pykata.agent.containers import Containers
from pykata.agent.crun import Crun
from pykata.agent.reaper import Reaper
from pykata.agent.service import AgentService, HealthService, build_server
from pykata.agent.spawn import CommandResult
from pykata.protocols import agent_pb2, health_pb2, oci_pb2
from pykata.protocols.oci_spec import process_from_json, resources_from_json, spec_from_json
from pykata.runtime.spec import default_spec
from pykata.ttrpc import Code, StatusError

METHODS = [
    *methods_of(agent_pb2.DESCRIPTOR.services_by_name["AgentService"]),
    *methods_of(health_pb2.DESCRIPTOR.services_by_name["Health"]),
]
HOSTNAME_FILE = Path("/proc/sys/kernel/hostname")
# Only GetOOMEvent waits for something that never happens here (an OOM kill):
# no container ever runs, so no wait or read has anything to wait for.
_LONG_POLLS = {("grpc.AgentService", "GetOOMEvent")}


class _FailingCrun:
    """Every crun call fails as crun would when it refuses; none runs anything."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: object, **kwargs: object) -> Any:
            await asyncio.sleep(0)  # crun takes time: let other requests interleave
            raise StatusError(Code.INTERNAL, f"crun {name}: not available while fuzzing")

        return fail


async def _failing_ip(reaper: Reaper, argv: Any, **kwargs: object) -> CommandResult:
    await asyncio.sleep(0)
    return CommandResult(tuple(argv), 1, b"", b"ip: not available while fuzzing")


def _refused_neighbor(*args: object) -> None:
    raise PermissionError(errno.EPERM, "not while fuzzing")


async def _fake_mount_storage(reaper: Reaper, storage: agent_pb2.Storage) -> Path:
    # The real function's checks of the request, without its mkdir and mount.
    if storage.driver not in storage_mod.DRIVERS:
        raise StatusError(Code.INVALID_ARGUMENT, f"storage driver {storage.driver!r}")
    target = storage_mod._check_mount_point(storage.mount_point)
    await asyncio.sleep(0)
    # Some mounts fail, so the undoing of the ones before them runs too.
    if "fail" in storage.source:
        raise StatusError(Code.INTERNAL, f"mounting {storage.source}: fuzzing fake says no")
    return target


async def _fake_unmount(reaper: Reaper, target: Path) -> None:
    await asyncio.sleep(0)


class AgentTarget(Target):
    max_len = 8192

    def __init__(self, harness: Harness) -> None:
        for name in ("DRIVERS", "_check_mount_point"):
            if not hasattr(storage_mod, name):
                raise RuntimeError(f"pykata.agent.storage.{name} is gone: update the fake "
                                   "mount_storage in fuzz/target_agent.py")
        base = harness.workdir / "agent"
        self.state_root = base / "containers"
        self.rootfs = base / "rootfs"
        self.hostname = base / "hostname"
        for path in (self.state_root, self.rootfs):
            path.mkdir(parents=True)
        self.hostname.write_text("fuzz\n")
        hostname = self.hostname

        def redirected_path(*parts: Any) -> Path:
            path = pathlib.Path(*parts)
            return hostname if path == HOSTNAME_FILE else path

        # Patched for the whole process: the worker exists only to fuzz.
        for module in (service_mod, containers_mod):
            replace(module, "mount_storage", _fake_mount_storage)
            replace(module, "unmount", _fake_unmount)
        replace(service_mod, "Path", redirected_path)
        # The worker's network is the machine's: never touched. `ip` fails as
        # it would when it refuses; neighbours are refused as to nobody.
        replace(loopback_mod, "up", lambda: None)
        replace(network_mod, "run", _failing_ip)
        replace(network_mod, "replace_neighbor", _refused_neighbor)

    async def one_input(self, data: bytes) -> None:
        reaper = Reaper()  # never installed: no SIGCHLD handler, nothing to reap
        containers = Containers(reaper, self.state_root)
        containers._crun = cast(Crun, _FailingCrun())
        agent = AgentService(reaper, containers)
        server = build_server(agent, HealthService())
        try:
            await drive(server, data, METHODS, lambda s, m: (s, m) in _LONG_POLLS)
        finally:
            await bounded(server.aclose(), "Server.aclose")
            # The OOM watcher lives as long as the sandbox; the agent is
            # thrown away here without a DestroySandbox.
            oom_task = agent._oom_task
            if oom_task is not None:
                oom_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await oom_task
        if containers.all():
            raise Violation("container-leak", f"containers kept after failed creates: "
                                              f"{[c.id for c in containers.all()]}")
        left = os.listdir(self.state_root)
        if left:
            for name in left:
                _remove(self.state_root / name)
            raise Violation("state-leak", f"left in the state root: {left}")

    # --- seeds -----------------------------------------------------------------

    def _spec(self, terminal: bool = False) -> oci_pb2.Spec:
        spec = default_spec(["sh", "-c", "echo hi"], terminal=terminal)
        spec["root"] = {"path": str(self.rootfs), "readonly": False}
        spec["annotations"] = {"io.kubernetes.cri.container-type": "container"}
        spec["linux"]["namespaces"].append({"type": "pid", "path": "/proc/1/ns/pid"})
        return spec_from_json(spec)

    def seeds(self) -> list[bytes]:
        a = agent_pb2
        storage = a.Storage(driver="9p", source="kataShared", fstype="9p",
                            options=["trans=virtio", "version=9p2000.L"],
                            mount_point="/run/pykata/shared")
        failing = a.Storage(driver="local", source="fail", mount_point="/run/x")
        process = process_from_json({"args": ["ls", "-l"], "cwd": "/", "env": ["A=b"],
                                     "user": {"uid": 0, "gid": 0}, "terminal": False})
        resources = resources_from_json({"memory": {"limit": 1 << 28},
                                         "cpu": {"shares": 512, "quota": 50000}})
        cid = "c1"
        sandbox = a.CreateSandboxRequest(hostname="pod", storages=[storage], sandbox_id="sb1")
        create = a.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=self._spec(),
                                          sandbox_pidns=True)
        per_container: list[tuple[str, Any]] = [
            ("StartContainer", a.StartContainerRequest(container_id=cid)),
            ("ExecProcess", a.ExecProcessRequest(container_id=cid, exec_id="e1",
                                                 process=process)),
            ("SignalProcess", a.SignalProcessRequest(container_id=cid, exec_id="", signal=15)),
            ("WaitProcess", a.WaitProcessRequest(container_id=cid, exec_id=cid)),
            ("WriteStdin", a.WriteStreamRequest(container_id=cid, exec_id=cid, data=b"hi\n")),
            ("ReadStdout", a.ReadStreamRequest(container_id=cid, exec_id=cid, len=4096)),
            ("ReadStderr", a.ReadStreamRequest(container_id=cid, exec_id="e1", len=1)),
            ("CloseStdin", a.CloseStdinRequest(container_id=cid, exec_id=cid)),
            ("TtyWinResize", a.TtyWinResizeRequest(container_id=cid, exec_id=cid, row=24,
                                                   column=80)),
            ("PauseContainer", a.PauseContainerRequest(container_id=cid)),
            ("ResumeContainer", a.ResumeContainerRequest(container_id=cid)),
            ("UpdateContainer", a.UpdateContainerRequest(container_id=cid,
                                                         resources=resources)),
            ("StatsContainer", a.StatsContainerRequest(container_id=cid)),
            ("ListProcesses", a.ListProcessesRequest(container_id=cid, format="json")),
            ("RemoveContainer", a.RemoveContainerRequest(container_id=cid)),
        ]
        seeds: list[bytes] = []

        def seed(*records: tuple[str, Any], delivery: int = DELIVER_RECORDS,
                 timeout: int | None = None) -> None:
            enc = Encoder().u8(delivery)
            for name, message in records:
                request_record(enc, METHODS, name, message, timeout=timeout)
            seeds.append(enc.getvalue())

        seed(("Check", health_pb2.CheckRequest()), ("Version", health_pb2.CheckRequest()))
        seed(("CreateSandbox", sandbox), ("GetGuestDetails", a.GuestDetailsRequest()),
             ("DestroySandbox", a.DestroySandboxRequest()))
        seed(("CreateContainer", create))
        seed(("CreateContainer", a.CreateContainerRequest(
            container_id=cid, exec_id="init", OCI=self._spec(terminal=True))))
        seed(("CreateContainer", a.CreateContainerRequest(
            container_id=cid, OCI=self._spec(), storages=[storage, failing])))
        # Two creates of one id in flight at once, then everything else on it.
        seed(("CreateContainer", create), ("CreateContainer", create), *per_container,
             delivery=DELIVER_SEGMENTS)
        for record in per_container:
            seed(record, timeout=30_000_000_000)
        seed(("CreateSandbox", sandbox), ("CreateContainer", create), *per_container[:4],
             ("GetOOMEvent", a.GetOOMEventRequest()),
             ("DestroySandbox", a.DestroySandboxRequest()), delivery=DELIVER_SEGMENTS)
        seed(("GetOOMEvent", a.GetOOMEventRequest()), timeout=1)

        enc = Encoder().u8(DELIVER_SEGMENTS)
        request_record(enc, METHODS, "Check", health_pb2.CheckRequest(),
                       metadata=[("containerd-namespace-ttrpc", "k8s.io")])
        enc.u8(TAG_PAUSE)
        request_record(enc, METHODS, "Check", health_pb2.CheckRequest(), sid_mode=SID_EXPLICIT,
                       sid=0xFFFF_FFFF)
        seeds.append(hostile_records(enc).getvalue())
        return seeds


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.unlink()


def make_target(harness: Harness) -> Target:
    return AgentTarget(harness)
