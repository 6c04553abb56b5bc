"""Conversion between OCI runtime configuration JSON and the agent's messages.

The messages of ``oci.proto`` carry the OCI config.json key of every field as
its ``json_name``, so :mod:`google.protobuf.json_format` does most of the work.
This module adds what json_format cannot do on its own:

* **Validation with a path.** Input is checked against the message
  descriptors first, so a malformed document fails with
  :class:`InvalidSpecError` naming the offending key, e.g.
  ``process.args: expected a list of strings``.
* **Unknown keys are dropped.** Only keys that are a field's ``json_name`` are
  kept (json_format would also accept the proto field names, like
  ``"Version"``; we do not). A JSON ``null`` counts as absent. OCI keys that
  the Kata message layout has no field for are therefore dropped too, see
  :data:`UNSUPPORTED_OCI_KEYS`; pass a list as ``dropped`` to learn which keys
  of a given document were dropped.
* **64-bit integers stay numbers.** json_format writes int64/uint64 as JSON
  strings (ProtoJSON), which the OCI schema does not allow and runc rejects;
  they are turned back into ints.
* **Required keys are written even when zero.** Fields that the OCI Go types
  encode without ``omitempty`` (``user.uid``, ``allow`` of a device rule,
  ``soft`` of an rlimit, ``containerID`` of an id mapping, ...) are always
  written, as a Go runtime would, because proto3 cannot tell such a zero from
  "not set". Fields where OCI uses a pointer are ``optional`` in oci.proto, so
  an explicit zero there (``swappiness: 0``) survives the round trip.

Shape differences between Kata's oci.proto and OCI JSON, all handled here or
in oci.proto: key spelling (every field has an explicit ``json_name``; note
``Pagesize`` is ``pageSize`` and the one-field oneof ``ErrnoRet`` of
``LinuxSyscall`` is the plain key ``errnoRet``); presence (above); 64-bit
integers (above); and the OCI keys Kata has no field for (dropped). Empty lists
and maps are not written back, which OCI treats the same as absent.
"""

from __future__ import annotations

import json
from typing import Any, Final, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from pykata.protocols import oci_pb2

__all__ = [
    "UNSUPPORTED_OCI_KEYS",
    "InvalidSpecError",
    "message_to_json",
    "process_from_json",
    "resources_from_json",
    "spec_from_json",
    "spec_to_json",
]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


#: OCI config.json keys (as paths) with no field in the agent protocol's
#: messages. They are silently dropped on input; so is any other unknown key.
#: The host checks them before a spec gets here (pykata.runtime.spec_versions):
#: each is refused, or dropped with a logged note when it names the host.
UNSUPPORTED_OCI_KEYS: Final = _words(
    """
    process.execCPUAffinity process.commandLine mounts[].uidMappings mounts[].gidMappings
    linux.timeOffsets linux.memoryPolicy linux.netDevices linux.resources.rdma
    linux.resources.memory.useHierarchy linux.seccomp.listenerPath
    linux.seccomp.listenerMetadata linux.intelRdt.closID linux.intelRdt.memBwSchema
    linux.intelRdt.schemata linux.intelRdt.enableCMT linux.intelRdt.enableMBM
    linux.intelRdt.enableMonitoring freebsd solaris windows vm zos
    """
)

# Fields the OCI Go types declare without omitempty: always written.
_ALWAYS: Final = frozenset(
    "grpc." + name
    for name in _words(
        """
    Spec.Version Process.User Process.Cwd Box.Height Box.Width User.UID User.GID
    POSIXRlimit.Type POSIXRlimit.Hard POSIXRlimit.Soft Mount.destination Root.Path Hook.Path
    LinuxIDMapping.HostID LinuxIDMapping.ContainerID LinuxIDMapping.Size LinuxNamespace.Type
    LinuxDevice.Path LinuxDevice.Type LinuxDevice.Major LinuxDevice.Minor
    LinuxWeightDevice.Major LinuxWeightDevice.Minor LinuxThrottleDevice.Major
    LinuxThrottleDevice.Minor LinuxThrottleDevice.Rate LinuxDeviceCgroup.Allow
    LinuxHugepageLimit.Pagesize LinuxHugepageLimit.Limit LinuxInterfacePriority.Name
    LinuxInterfacePriority.Priority LinuxSeccomp.DefaultAction LinuxSyscall.Action
    LinuxSeccompArg.Index LinuxSeccompArg.Value LinuxSeccompArg.Op
    LinuxIOPriority.Class LinuxIOPriority.Priority LinuxScheduler.Policy
    LinuxPersonality.Domain
    """
    )
)

_F = FieldDescriptor
# Integer proto types: inclusive range and the name used in error messages.
_INTS: Final[dict[int, tuple[int, int, str]]] = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1, "32-bit integer"),
    _F.TYPE_UINT32: (0, 2**32 - 1, "unsigned 32-bit integer"),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1, "64-bit integer"),
    _F.TYPE_UINT64: (0, 2**64 - 1, "unsigned 64-bit integer"),
}
_INT64_TYPES: Final = frozenset((_F.TYPE_INT64, _F.TYPE_UINT64))

M = TypeVar("M", bound=Message)


class InvalidSpecError(ValueError):
    """A JSON document does not fit the OCI configuration schema."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or '<document>'}: {problem}")
        #: Where the problem is, e.g. ``process.rlimits[0].hard``.
        self.path = path
        self.problem = problem


def spec_from_json(data: dict[str, Any], *, dropped: list[str] | None = None) -> oci_pb2.Spec:
    """Build a Spec from a parsed config.json; unknown keys go to ``dropped``."""
    return _from_json(data, oci_pb2.Spec(), dropped)


def process_from_json(data: dict[str, Any], *, dropped: list[str] | None = None) -> oci_pb2.Process:
    """Build a Process from the JSON of an OCI process (as in an exec request)."""
    return _from_json(data, oci_pb2.Process(), dropped)


def resources_from_json(
    data: dict[str, Any], *, dropped: list[str] | None = None
) -> oci_pb2.LinuxResources:
    """Build LinuxResources from the JSON of OCI linux.resources (an update)."""
    return _from_json(data, oci_pb2.LinuxResources(), dropped)


def spec_to_json(spec: oci_pb2.Spec) -> dict[str, Any]:
    """Render a Spec as a config.json document that crun and runc accept."""
    return message_to_json(spec)


def message_to_json(message: Message) -> dict[str, Any]:
    """Render any message of oci.proto with OCI keys and numeric integers."""
    raw = json_format.MessageToDict(message)
    return _fix_output(raw, cast(Descriptor, message.DESCRIPTOR))


def _from_json(data: Any, message: M, dropped: list[str] | None) -> M:
    clean = _clean_object(data, cast(Descriptor, message.DESCRIPTOR), "", dropped)
    try:
        json_format.ParseDict(clean, message)
    except json_format.ParseError as err:  # pragma: no cover - pre-validated
        raise InvalidSpecError("", str(err)) from err
    return message


def _describe(field: FieldDescriptor, plural: bool = False) -> str:
    if field.type == _F.TYPE_MESSAGE:
        return "objects" if plural else "an object"
    if field.type == _F.TYPE_STRING:
        return "strings" if plural else "a string"
    if field.type == _F.TYPE_BOOL:
        return "booleans" if plural else "a boolean"
    name = _INTS[field.type][2]
    if plural:
        return name + "s"
    return ("an " if name.startswith("u") else "a ") + name


def _scalar_ok(value: Any, field: FieldDescriptor) -> bool:
    if field.type == _F.TYPE_STRING:
        return isinstance(value, str)
    if field.type == _F.TYPE_BOOL:
        return isinstance(value, bool)
    low, high, _ = _INTS[field.type]
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _sub(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == _F.TYPE_MESSAGE and _sub(field).GetOptions().map_entry


def _clean_object(
    data: Any, desc: Descriptor, path: str, dropped: list[str] | None
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidSpecError(path, "expected an object")
    by_key = {f.json_name: f for f in desc.fields}
    out: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        field = by_key.get(key)
        if field is None:
            if dropped is not None:
                dropped.append(sub)
        elif value is not None:
            out[key] = _clean_field(value, field, sub, dropped)
    return out


def _clean_field(value: Any, field: FieldDescriptor, path: str, dropped: list[str] | None) -> Any:
    if _is_map(field):
        value_field = _sub(field).fields_by_name["value"]
        if not isinstance(value, dict):
            raise InvalidSpecError(path, f"expected an object of {_describe(value_field, True)}")
        for key, item in value.items():
            if not _scalar_ok(item, value_field):
                raise InvalidSpecError(
                    f"{path}[{json.dumps(key)}]", f"expected {_describe(value_field)}"
                )
        return dict(value)
    if field.is_repeated:
        if not isinstance(value, list):
            raise InvalidSpecError(path, f"expected a list of {_describe(field, True)}")
        if field.type == _F.TYPE_MESSAGE:
            return [
                _clean_object(item, _sub(field), f"{path}[{i}]", dropped)
                for i, item in enumerate(value)
            ]
        if not all(_scalar_ok(item, field) for item in value):
            raise InvalidSpecError(path, f"expected a list of {_describe(field, True)}")
        return list(value)
    if field.type == _F.TYPE_MESSAGE:
        return _clean_object(value, _sub(field), path, dropped)
    if not _scalar_ok(value, field):
        raise InvalidSpecError(path, f"expected {_describe(field)}")
    return value


def _zero(field: FieldDescriptor) -> Any:
    if field.type == _F.TYPE_MESSAGE:
        return {}
    if field.type == _F.TYPE_STRING:
        return ""
    if field.type == _F.TYPE_BOOL:
        return False
    return 0


def _fix_output(raw: dict[str, Any], desc: Descriptor) -> dict[str, Any]:
    """Rebuild ``raw`` in field order, with required zeros and int64 numbers."""
    out: dict[str, Any] = {}
    for field in desc.fields:
        key = field.json_name
        if key in raw:
            value = raw[key]
        elif field.full_name in _ALWAYS:
            value = _zero(field)
        else:
            continue
        if _is_map(field):
            pass  # string to string in every map of oci.proto
        elif field.type == _F.TYPE_MESSAGE:
            sub = _sub(field)
            if field.is_repeated:
                value = [_fix_output(item, sub) for item in value]
            else:
                value = _fix_output(value, sub)
        elif field.type in _INT64_TYPES:
            value = [int(v) for v in value] if field.is_repeated else int(value)
        out[key] = value
    return out
