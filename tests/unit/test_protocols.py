"""The generated protocol modules: freshness and wire compatibility."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from pykata.protocols import (
    agent_pb2,
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    events_service_pb2,
    health_pb2,
    mount_pb2,
    oci_pb2,
    shim_pb2,
    task_types_pb2,
)

PROTOCOLS = Path(__file__).resolve().parents[2] / "src" / "pykata" / "protocols"


# Hand encoding of the protobuf wire format, independent of the library.


def varint(value: int) -> bytes:
    """Encode a varint; negative numbers as 64-bit two's complement."""
    value &= 2**64 - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def num(field: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(field << 3) + varint(value)


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes, messages."""
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(field << 3 | 2) + varint(len(data)) + data


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    """Running protoc again gives byte-identical *_pb2.py/.pyi to what is committed."""
    pytest.importorskip("grpc_tools")
    bindir = os.path.dirname(sys.executable)
    plugin = shutil.which(
        "protoc-gen-mypy", path=os.pathsep.join([bindir, os.environ.get("PATH", "")])
    )
    if plugin is None:
        pytest.skip("protoc-gen-mypy (mypy-protobuf) is not installed")
    out = tmp_path / "pykata" / "protocols"
    out.mkdir(parents=True)
    protos = sorted(PROTOCOLS.glob("*.proto"))
    for proto in protos:
        shutil.copy(proto, out / proto.name)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
         f"--plugin=protoc-gen-mypy={plugin}", "--mypy_out=quiet:.",
         *(f"pykata/protocols/{p.name}" for p in protos)],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    fresh = sorted(p.name for p in out.glob("*_pb2.py*"))
    committed = sorted(p.name for p in PROTOCOLS.glob("*_pb2.py*"))
    assert committed == fresh, "stale or missing generated files: run scripts/gen-protos"
    for name in fresh:
        assert (PROTOCOLS / name).read_bytes() == (out / name).read_bytes(), (
            f"{name} is out of date: run scripts/gen-protos"
        )


def test_service_methods() -> None:
    """Services and methods are named as upstream; ttRPC routes by these names."""

    def methods(module: ModuleType, service: str) -> dict[str, tuple[str, str]]:
        desc = module.DESCRIPTOR.services_by_name[service]
        return {m.name: (m.input_type.name, m.output_type.name) for m in desc.methods}

    shim = methods(shim_pb2, "Task")
    assert shim_pb2.DESCRIPTOR.services_by_name["Task"].full_name == "containerd.task.v2.Task"
    assert list(shim) == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
        "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
    ]  # fmt: skip
    assert shim["Create"] == ("CreateTaskRequest", "CreateTaskResponse")
    assert shim["Kill"] == ("KillRequest", "Empty")
    agent = methods(agent_pb2, "AgentService")
    assert agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name == "grpc.AgentService"
    assert set(agent) == {
        "CreateContainer", "StartContainer", "RemoveContainer", "ExecProcess", "SignalProcess",
        "WaitProcess", "ListProcesses", "UpdateContainer", "StatsContainer", "PauseContainer",
        "ResumeContainer", "WriteStdin", "ReadStdout", "ReadStderr", "CloseStdin",
        "TtyWinResize", "CreateSandbox", "DestroySandbox", "GetGuestDetails", "GetOOMEvent",
        "UpdateInterface", "UpdateRoutes", "ListInterfaces", "ListRoutes", "AddARPNeighbors",
        "GetBootProfile", "ReseedRandomDev", "SetGuestDateTime", "StartDebugConsole",
        "GetMetrics", "GetTraceSpans",
    }  # fmt: skip
    # Kata's field numbers for the calls that make a template's clone its own.
    assert agent_pb2.ReseedRandomDevRequest.DESCRIPTOR.fields_by_name["data"].number == 2
    when = agent_pb2.SetGuestDateTimeRequest.DESCRIPTOR.fields_by_name
    assert (when["Sec"].number, when["Usec"].number) == (1, 2)
    assert agent["UpdateInterface"] == ("UpdateInterfaceRequest", "Interface")
    assert agent["UpdateRoutes"] == ("UpdateRoutesRequest", "Routes")
    # Kata's field numbers: the wire carries these, not the names.
    iface = agent_pb2.Interface.DESCRIPTOR.fields_by_name
    assert [iface[n].number for n in ("device", "name", "IPAddresses", "mtu", "hwAddr")] == [
        1, 2, 3, 4, 5]
    route = agent_pb2.Route.DESCRIPTOR.fields_by_name
    assert [route[n].number for n in ("dest", "gateway", "device", "source", "scope")] == [
        1, 2, 3, 4, 5]
    assert agent["ReadStderr"] == ("ReadStreamRequest", "ReadStreamResponse")
    assert agent["CreateContainer"] == ("CreateContainerRequest", "Empty")
    assert agent["GetOOMEvent"] == ("GetOOMEventRequest", "OOMEvent")
    assert methods(health_pb2, "Health") == {
        "Check": ("CheckRequest", "HealthCheckResponse"),
        "Version": ("CheckRequest", "VersionCheckResponse"),
    }
    events = events_service_pb2.DESCRIPTOR.services_by_name["Events"]
    assert events.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in events.methods] == ["Forward"]


def test_create_task_request_wire() -> None:
    """containerd's CreateTaskRequest decodes with the field numbers of shim.proto."""
    options = any_pb2.Any(type_url="x/y", value=b"\x01")
    request = shim_pb2.CreateTaskRequest(
        id="c1",
        bundle="/run/b",
        rootfs=[mount_pb2.Mount(type="overlay", source="ov", options=["lowerdir=/l"])],
        terminal=True,
        stdin="/i",
        stdout="/o",
        stderr="/e",
        checkpoint="ck",
        parent_checkpoint="pc",
        options=options,
    )
    mount = ld(1, "overlay") + ld(2, "ov") + ld(4, "lowerdir=/l")
    expected = (
        ld(1, "c1") + ld(2, "/run/b") + ld(3, mount) + num(4, 1) + ld(5, "/i") + ld(6, "/o")
        + ld(7, "/e") + ld(8, "ck") + ld(9, "pc") + ld(10, ld(1, "x/y") + ld(2, b"\x01"))
    )  # fmt: skip
    assert request.SerializeToString() == expected
    assert shim_pb2.CreateTaskRequest.FromString(expected) == request


def test_state_and_wait_wire() -> None:
    """StateResponse status/exec_id and WaitResponse exited_at use upstream numbers."""
    state = shim_pb2.StateResponse(
        id="c1", pid=42, status=task_types_pb2.STOPPED, exit_status=137, exec_id="e1"
    )
    assert state.SerializeToString() == (
        ld(1, "c1") + num(3, 42) + num(4, 3) + num(9, 137) + ld(11, "e1")
    )
    when = timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)
    wait = shim_pb2.WaitResponse(exit_status=1, exited_at=when)
    assert wait.SerializeToString() == num(1, 1) + ld(2, num(1, 1700000000) + num(2, 5))
    pids = shim_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=7)])
    assert pids.SerializeToString() == ld(1, num(1, 7))


def test_agent_create_container_wire() -> None:
    """CreateContainerRequest carries the OCI spec in field 6, as the Kata agent expects."""
    request = agent_pb2.CreateContainerRequest(
        container_id="ctr",
        exec_id="ctr",
        storages=[agent_pb2.Storage(driver="9p", mount_point="/run/x")],
        OCI=oci_pb2.Spec(Version="1.0.2", Hostname="h"),
        sandbox_pidns=True,
        stdout_port=1025,
    )
    expected = (
        ld(1, "ctr") + ld(2, "ctr") + ld(5, ld(1, "9p") + ld(6, "/run/x"))
        + ld(6, ld(1, "1.0.2") + ld(4, "h")) + num(7, 1) + num(10, 1025)
    )  # fmt: skip
    assert request.SerializeToString() == expected


def test_agent_exec_process_wire() -> None:
    """ExecProcessRequest: string_user is field 3, the OCI process field 4."""
    process = oci_pb2.Process(Terminal=True, Args=["sh"], Cwd="/", OOMScoreAdj=0)
    process.User.UID = 1000
    request = agent_pb2.ExecProcessRequest(
        container_id="c",
        exec_id="e",
        string_user=agent_pb2.StringUser(uid="1000", gid="0", additionalGids=["10"]),
        process=process,
    )
    user = ld(1, "1000") + ld(2, "0") + ld(3, "10")
    body = num(1, 1) + ld(3, num(1, 1000)) + ld(4, "sh") + ld(6, "/") + num(11, 0)
    assert request.SerializeToString() == ld(1, "c") + ld(2, "e") + ld(3, user) + ld(4, body)


def test_agent_wait_and_stream_wire() -> None:
    """WaitProcessResponse.status is an int32 in field 1; stream calls as upstream."""
    assert agent_pb2.WaitProcessResponse(status=137).SerializeToString() == b"\x08\x89\x01"
    negative = agent_pb2.WaitProcessResponse(status=-1).SerializeToString()
    assert negative == b"\x08" + b"\xff" * 9 + b"\x01"
    read = agent_pb2.ReadStreamRequest(container_id="c", exec_id="e", len=4096)
    assert read.SerializeToString() == ld(1, "c") + ld(2, "e") + num(3, 4096)
    resize = agent_pb2.TtyWinResizeRequest(row=24, column=80)
    assert resize.SerializeToString() == num(3, 24) + num(4, 80)
    details = agent_pb2.GuestDetailsResponse(
        agent_details=agent_pb2.AgentDetails(version="0.1", init_daemon=True)
    )
    assert details.SerializeToString() == ld(2, ld(1, "0.1") + num(2, 1))
    health = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    assert health.SerializeToString() == num(1, 1)


def test_oci_spec_wire() -> None:
    """A few oci.proto numbers that differ from the JSON key order."""
    spec = oci_pb2.Spec()
    spec.Linux.UIDMappings.add(HostID=5, ContainerID=6, Size=7)
    spec.Linux.Resources.HugepageLimits.add(Pagesize="2MB", Limit=9)
    spec.Linux.Seccomp.Syscalls.add(Names=["bpf"], errnoret=0)
    mapping = num(1, 5) + num(2, 6) + num(3, 7)
    resources = ld(6, ld(1, "2MB") + num(2, 9))
    syscall = ld(1, "bpf") + num(3, 0)
    linux = ld(1, mapping) + ld(4, resources) + ld(8, ld(4, syscall))
    assert spec.SerializeToString() == ld(8, linux)


def test_envelope_wire() -> None:
    """Events.Forward's Envelope: timestamp 1, namespace 2, topic 3, event 4."""
    exited = timestamp_pb2.Timestamp(seconds=10)
    event = events_pb2.TaskExit(container_id="c", id="c", pid=9, exit_status=143, exited_at=exited)
    payload = ld(1, "c") + ld(2, "c") + num(3, 9) + num(4, 143) + ld(5, num(1, 10))
    assert event.SerializeToString() == payload
    packed = any_pb2.Any(type_url="containerd.events.TaskExit", value=payload)
    envelope = events_service_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=11), namespace="k8s.io",
        topic="/tasks/exit", event=packed,
    )  # fmt: skip
    expected = (
        ld(1, num(1, 11)) + ld(2, "k8s.io") + ld(3, "/tasks/exit")
        + ld(4, ld(1, "containerd.events.TaskExit") + ld(2, payload))
    )  # fmt: skip
    assert envelope.SerializeToString() == expected
    forward = events_service_pb2.ForwardRequest(envelope=envelope)
    assert forward.SerializeToString() == ld(1, expected)
    delete = events_pb2.TaskDelete(container_id="c", pid=9, id="e")
    assert delete.SerializeToString() == ld(1, "c") + num(2, 9) + ld(5, "e")


def test_cgroup_metrics_wire() -> None:
    """Stats payloads: v1 memory is field 4 of Metrics, v2 memory is field 4 too."""
    v1 = cgroups_v1_pb2.Metrics(
        pids=cgroups_v1_pb2.PidsStat(current=3),
        memory=cgroups_v1_pb2.MemoryStat(usage=cgroups_v1_pb2.MemoryEntry(usage=100)),
        memory_oom_control=cgroups_v1_pb2.MemoryOomControl(oom_kill=1),
    )
    assert v1.SerializeToString() == (
        ld(2, num(1, 3)) + ld(4, ld(33, num(2, 100))) + ld(9, num(3, 1))
    )
    v2 = cgroups_v2_pb2.Metrics(
        cpu=cgroups_v2_pb2.CPUStat(usage_usec=5),
        memory=cgroups_v2_pb2.MemoryStat(usage=100, usage_limit=200),
        memory_events=cgroups_v2_pb2.MemoryEvents(oom_kill=2),
    )
    assert v2.SerializeToString() == (
        ld(2, num(1, 5)) + ld(4, num(32, 100) + num(33, 200)) + ld(8, num(5, 2))
    )
