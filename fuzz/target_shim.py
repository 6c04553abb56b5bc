"""Target ``shim``: the shim's task service (`containerd.task.v2.Task`).

`TaskService` with the real `TASK_REQUESTS` mapping, registered on the real
ttRPC server, serves one in-memory connection carrying what a hostile client of
the shim sends (see `fuzz._server`). Every request must be answered with a
response or a status, never crash the service or hang.

No VM can start: the configuration's QEMU does not exist. Events go nowhere
(an empty TTRPC_ADDRESS). PYKATA_RUN_ROOT is in the work directory. Requests
name arbitrary host paths (bundles, FIFOs, mount sources), so the worker runs
as nobody: anything outside the work directory is read-only to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from fuzz._bytes import Encoder
from fuzz._harness import Harness, Target, Violation, bounded
from fuzz._server import (
    DELIVER_RECORDS,
    DELIVER_SEGMENTS,
    TAG_PAUSE,
    Method,
    drive,
    hostile_records,
    methods_of,
    request_record,
)
from pykata import config as config_mod
from pykata.protocols import mount_pb2, shim_pb2
from pykata.runtime.spec import default_spec
from pykata.shim.events import EventPublisher
from pykata.shim.server import TASK_SERVICE
from pykata.shim.service import TASK_REQUESTS, TaskService
from pykata.ttrpc import Server

METHODS: list[Method] = methods_of(
    shim_pb2.DESCRIPTOR.services_by_name["Task"], names=list(TASK_REQUESTS)
)
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def _never_blocks(service: str, method: str) -> bool:
    # Wait blocks on a running process; no process ever runs here (no VM),
    # so every request is answered at once.
    return False


class ShimTarget(Target):
    max_len = 8192

    def __init__(self, harness: Harness) -> None:
        base = harness.workdir / "shim"
        self.run_root = base / "run"
        self.run_root.mkdir(parents=True)
        os.environ["PYKATA_RUN_ROOT"] = str(self.run_root)
        missing = base / "no-qemu"
        self.config = config_mod.parse({"hypervisor": {"qemu": {
            "path": str(missing / "qemu-system-x86_64"),
            "kernel": str(missing / "vmlinux"),
            "initrd": str(missing / "initrd.img"),
            "accel": "tcg",
            "enable_annotations": ["default_vcpus", "default_memory", "kernel_params"],
        }}}, "fuzz configuration")
        if os.path.exists(self.config.qemu.path):
            raise RuntimeError(f"{self.config.qemu.path} exists: a VM could start")
        self.volume = base / "volume"
        self.volume.mkdir()
        self.bundle = self._bundle(base / "bundle", {})
        self.pod_bundle = self._bundle(base / "pod", {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1",
            "io.katacontainers.config.hypervisor.default_vcpus": "2",
            "io.katacontainers.config.hypervisor.default_memory": "256",
        }, volume=True)
        self.bad_bundle = base / "bad"
        self.bad_bundle.mkdir()
        (self.bad_bundle / "config.json").write_text('{"ociVersion": 1, "process": []}')
        self.idle_calls = 0

    def _bundle(self, path: Path, annotations: dict[str, str], volume: bool = False) -> Path:
        (path / "rootfs").mkdir(parents=True)
        spec: dict[str, Any] = default_spec(["sh"])
        spec["annotations"] = annotations
        if volume:
            spec["mounts"].append({"destination": "/data", "type": "bind",
                                   "source": str(self.volume), "options": ["rbind", "ro"]})
        (path / "config.json").write_text(json.dumps(spec))
        for name in ("stdin", "stdout", "stderr"):
            os.mkfifo(path / name)
        return path

    def _on_idle(self) -> None:
        self.idle_calls += 1

    async def one_input(self, data: bytes) -> None:
        publisher = EventPublisher("", "fuzz")
        service = TaskService(self.config, publisher, on_idle=self._on_idle)
        server = Server()
        server.register_object(TASK_SERVICE, service, TASK_REQUESTS)
        try:
            await drive(server, data, METHODS, _never_blocks)
        finally:
            await bounded(server.aclose(), "Server.aclose")
            await bounded(service.close(), "TaskService.close")
            await bounded(publisher.close(), "EventPublisher.close")
        if service.owned is not None:
            raise Violation("task-leak", "a pod kept though no VM can start")
        left = [str(p.relative_to(self.run_root)) for p in self.run_root.rglob("*")
                if not p.is_dir() or any(p.iterdir())]
        if left:
            raise Violation("state-leak", f"left under PYKATA_RUN_ROOT: {left[:20]}")

    # --- seeds -----------------------------------------------------------------

    def seeds(self) -> list[bytes]:
        s = shim_pb2
        tid = "c1"

        def create(bundle: Path, **fields: Any) -> Message:
            return s.CreateTaskRequest(
                id=tid, bundle=str(bundle), stdin=str(bundle / "stdin"),
                stdout=str(bundle / "stdout"), stderr=str(bundle / "stderr"), **fields)

        overlay = mount_pb2.Mount(type="overlay", source="overlay", options=[
            f"lowerdir={self.volume}", f"upperdir={self.volume}/u", f"workdir={self.volume}/w"])
        process = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(
            {"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).encode())
        resources = any_pb2.Any(type_url=RESOURCES_URL, value=json.dumps(
            {"memory": {"limit": 1 << 28}, "pids": {"limit": 100}}).encode())
        per_task: list[tuple[str, Message]] = [
            ("State", s.StateRequest(id=tid)),
            ("Start", s.StartRequest(id=tid)),
            ("Exec", s.ExecProcessRequest(id=tid, exec_id="e1", spec=process,
                                          stdout=str(self.bundle / "stdout"))),
            ("Start", s.StartRequest(id=tid, exec_id="e1")),
            ("ResizePty", s.ResizePtyRequest(id=tid, width=80, height=24)),
            ("CloseIO", s.CloseIORequest(id=tid, stdin=True)),
            ("Pids", s.PidsRequest(id=tid)),
            ("Pause", s.PauseRequest(id=tid)),
            ("Resume", s.ResumeRequest(id=tid)),
            ("Update", s.UpdateTaskRequest(id=tid, resources=resources)),
            ("Stats", s.StatsRequest(id=tid)),
            ("Kill", s.KillRequest(id=tid, signal=9, all=True)),
            ("Wait", s.WaitRequest(id=tid)),
            ("Delete", s.DeleteRequest(id=tid)),
            ("Checkpoint", s.CheckpointTaskRequest(id=tid)),
            ("Connect", s.ConnectRequest(id=tid)),
            ("Shutdown", s.ShutdownRequest(id=tid, now=True)),
        ]
        seeds: list[bytes] = []

        def seed(*records: tuple[str, Message], delivery: int = DELIVER_RECORDS,
                 timeout: int | None = None) -> None:
            enc = Encoder().u8(delivery)
            for name, message in records:
                request_record(enc, METHODS, name, message, timeout=timeout)
            seeds.append(enc.getvalue())

        seed(("Create", create(self.bundle)))
        seed(("Create", create(self.bundle, terminal=True, rootfs=[overlay])))
        seed(("Create", create(self.pod_bundle)), ("State", s.StateRequest(id=tid)))
        seed(("Create", create(self.bad_bundle)))
        seed(("Create", s.CreateTaskRequest(id="../x", bundle="/")))
        seed(("Create", create(self.bundle, checkpoint="/tmp/cp")))
        seed(("Create", create(self.bundle)), ("Create", create(self.bundle)), *per_task,
             delivery=DELIVER_SEGMENTS)
        for record in per_task:
            seed(record, timeout=10_000_000_000)
        enc = Encoder().u8(DELIVER_SEGMENTS)
        request_record(enc, METHODS, "Connect", s.ConnectRequest(),
                       metadata=[("containerd-namespace-ttrpc", "default")])
        seeds.append(hostile_records(enc.u8(TAG_PAUSE)).getvalue())
        return seeds


def make_target(harness: Harness) -> Target:
    return ShimTarget(harness)
