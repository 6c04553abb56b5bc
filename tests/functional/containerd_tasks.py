"""containerd's task API over gRPC, for what `ctr` cannot do: create a task
without starting it (the "created" phase CRI's CreateContainer leaves a task in).

The messages are declared here at run time, with the field numbers of
containerd's api/services/tasks/v1/tasks.proto and api/types/mount.proto;
only the fields the tests use.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_UINT32 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "Mount": [("type", 1, _STRING, _OPTIONAL, ""), ("source", 2, _STRING, _OPTIONAL, ""),
              ("target", 3, _STRING, _OPTIONAL, ""), ("options", 4, _STRING, _REPEATED, "")],
    "CreateTaskRequest": [
        ("container_id", 1, _STRING, _OPTIONAL, ""), ("rootfs", 3, _MESSAGE, _REPEATED, "Mount"),
        ("stdin", 4, _STRING, _OPTIONAL, ""), ("stdout", 5, _STRING, _OPTIONAL, ""),
        ("stderr", 6, _STRING, _OPTIONAL, ""), ("terminal", 7, _BOOL, _OPTIONAL, "")],
    "CreateTaskResponse": [("container_id", 1, _STRING, _OPTIONAL, ""),
                           ("pid", 2, _UINT32, _OPTIONAL, "")],
}
_PACKAGE = "pykata.tests.containerd"


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    fdp = descriptor_pb2.FileDescriptorProto(name="pykata_tests_containerd_tasks.proto",
                                             package=_PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = fdp.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            message.field.add(name=field, number=number, type=kind, label=label,
                              type_name=f".{_PACKAGE}.{type_name}" if type_name else None)
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{_PACKAGE}.{name}")) for name in _MESSAGES}


_TYPES = _classes()


def snapshot_mounts(ctr: list[str], key: str) -> list[Any]:
    """The mounts of snapshot `key`, from `ctr snapshots mounts` (a mount command)."""
    out = subprocess.run([*ctr, "snapshots", "mounts", "/rootfs", key], capture_output=True,
                         text=True, check=True).stdout
    words = shlex.split(out)
    kind = words[words.index("-t") + 1]
    options = words[words.index("-o") + 1].split(",") if "-o" in words else []
    return [_TYPES["Mount"](type=kind, source=words[words.index("-t") + 2],
                            options=options)]


def create_task(socket: Path, namespace: str, container_id: str, rootfs: list[Any]) -> int:
    """Tasks.Create (without Start); returns the task's pid. No stdio."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        create = channel.unary_unary(
            "/containerd.services.tasks.v1.Tasks/Create",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=_TYPES["CreateTaskResponse"].FromString,
        )
        request = _TYPES["CreateTaskRequest"](container_id=container_id, rootfs=rootfs)
        response = create(request, metadata=[("containerd-namespace", namespace)], timeout=180)
    return int(response.pid)
