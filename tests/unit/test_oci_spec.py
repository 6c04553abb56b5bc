"""Conversion between OCI config.json documents and the agent's Spec message."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pykata.protocols import oci_pb2
from pykata.protocols.oci_spec import (
    UNSUPPORTED_OCI_KEYS,
    InvalidSpecError,
    message_to_json,
    process_from_json,
    resources_from_json,
    spec_from_json,
    spec_to_json,
)

RLIM_INFINITY = 2**64 - 1
CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def realistic_config() -> dict[str, Any]:
    """A config.json shaped like `runc spec` output, plus the usual CRI extras."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": True,
            "consoleSize": {"height": 25, "width": 80},
            "user": {"uid": 0, "gid": 0, "additionalGids": [10, 11]},
            "args": ["sh", "-c", "echo hello"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": CAPS,
                "effective": CAPS,
                "inheritable": CAPS,
                "permitted": CAPS,
                "ambient": CAPS,
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                {"type": "RLIMIT_CORE", "hard": RLIM_INFINITY, "soft": 0},
            ],
            "noNewPrivileges": True,
            "apparmorProfile": "pykata-default",
            "oomScoreAdj": -998,
            "selinuxLabel": "system_u:system_r:container_t:s0",
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
        ],
        "hooks": {
            "prestart": [{"path": "/usr/bin/fix-mounts", "args": ["fix-mounts", "arg1"]}],
            "createRuntime": [{"path": "/usr/bin/net", "env": ["A=1"], "timeout": 5}],
            "poststop": [{"path": "/usr/sbin/cleanup.sh", "args": ["cleanup.sh", "-f"]}],
        },
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "f00",
        },
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "sysctl": {"net.ipv4.ip_forward": "1"},
            "resources": {
                "devices": [
                    {"allow": False, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
                ],
                "memory": {
                    "limit": 8 * 2**30,
                    "reservation": 2**31,
                    "swap": -1,
                    "swappiness": 0,
                    "disableOOMKiller": False,
                },
                "cpu": {
                    "shares": 1024,
                    "quota": 100000,
                    "period": 100000,
                    "realtimeRuntime": 0,
                    "cpus": "0-3",
                    "mems": "0",
                },
                "pids": {"limit": 32768},
                "blockIO": {
                    "weight": 500,
                    "weightDevice": [{"major": 8, "minor": 0, "weight": 200}],
                    "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 2**40}],
                    "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 300}],
                },
                "hugepageLimits": [{"pageSize": "2MB", "limit": 2**33}],
                "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 0}]},
            },
            "cgroupsPath": "/kubepods/besteffort/pod1/ctr1",
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "cgroup"},
            ],
            "devices": [
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "uid": 0, "gid": 0},
            ],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
                "syscalls": [
                    {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                    {
                        "names": ["personality"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
                    },
                    {
                        "names": ["clone"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [
                            {
                                "index": 0,
                                "value": 2114060288,
                                "valueTwo": 0,
                                "op": "SCMP_CMP_MASKED_EQ",
                            }
                        ],
                    },
                    {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0},
                    {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                ],
            },
            "rootfsPropagation": "rslave",
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/sys"],
            "mountLabel": "system_u:object_r:container_file_t:s0",
            "intelRdt": {"l3CacheSchema": "L3:0=ff"},
        },
    }


def without_zero_value_two(config: dict[str, Any]) -> dict[str, Any]:
    """Expected output: valueTwo is omitempty in OCI, so an explicit 0 is not written back."""
    expected = copy.deepcopy(config)
    expected["linux"]["seccomp"]["syscalls"][2]["args"][0].pop("valueTwo")
    return expected


def test_round_trip_realistic_config() -> None:
    """A runc-style config.json comes back unchanged (except omitempty zeros)."""
    config = realistic_config()
    dropped: list[str] = []
    out = spec_to_json(spec_from_json(config, dropped=dropped))
    assert dropped == []
    assert out == without_zero_value_two(config)


def test_round_trip_through_the_wire() -> None:
    """Serialising the Spec to protobuf bytes and back changes nothing."""
    spec = spec_from_json(realistic_config())
    again = oci_pb2.Spec.FromString(spec.SerializeToString())
    assert spec_to_json(again) == without_zero_value_two(realistic_config())


def drop_empty(value: Any) -> Any:
    """Remove empty lists and objects, which the protobuf form does not keep."""
    if isinstance(value, dict):
        return {k: drop_empty(v) for k, v in value.items() if v not in ([], {})}
    if isinstance(value, list):
        return [drop_empty(v) for v in value]
    return value


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_round_trip_of_runtime_default_spec(runtime: str, tmp_path: Path) -> None:
    """The config.json that `runc spec` / `crun spec` prints survives a round trip."""
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    subprocess.run([runtime, "spec"], cwd=tmp_path, check=True, capture_output=True)
    config = json.loads((tmp_path / "config.json").read_text())
    dropped: list[str] = []
    assert spec_to_json(spec_from_json(config, dropped=dropped)) == drop_empty(config)
    assert dropped == []


def test_output_is_plain_json_with_numeric_int64() -> None:
    """64-bit values are JSON numbers, not ProtoJSON strings."""
    text = json.dumps(spec_to_json(spec_from_json(realistic_config())))
    back = json.loads(text)
    assert back["linux"]["resources"]["memory"]["limit"] == 8 * 2**30
    assert back["linux"]["resources"]["memory"]["swap"] == -1
    assert back["process"]["rlimits"][1]["hard"] == RLIM_INFINITY
    assert back["process"]["oomScoreAdj"] == -998
    assert back["linux"]["devices"][0]["major"] == 10
    assert '"8589934592"' not in text


def test_values_reach_the_right_fields() -> None:
    """Spot checks that json_name maps each key onto the Kata field."""
    spec = spec_from_json(realistic_config())
    assert spec.Version == "1.0.2-dev"
    assert spec.Process.Rlimits[1].Hard == RLIM_INFINITY
    assert spec.Linux.CgroupsPath == "/kubepods/besteffort/pod1/ctr1"
    assert spec.Linux.Resources.HugepageLimits[0].Pagesize == "2MB"
    assert spec.Linux.UIDMappings[0].HostID == 100000
    assert spec.Linux.Resources.Memory.HasField("Swappiness")
    assert not spec.Linux.Resources.Devices[0].HasField("Major")
    assert spec.Linux.Seccomp.Syscalls[3].WhichOneof("ErrnoRet") == "errnoret"
    assert spec.Linux.Seccomp.Syscalls[0].WhichOneof("ErrnoRet") is None
    assert spec.Annotations["io.kubernetes.cri.sandbox-id"] == "f00"


def test_required_zero_values_are_written() -> None:
    """Keys OCI requires are present even when zero, as a Go runtime writes them."""
    spec = oci_pb2.Spec()
    spec.Process.Cwd = "/"
    spec.Process.Rlimits.add(Type="RLIMIT_CORE")
    spec.Linux.Resources.Devices.add(Access="rwm")
    spec.Linux.UIDMappings.add(Size=1)
    out = spec_to_json(spec)
    assert out["ociVersion"] == ""
    assert out["process"]["user"] == {"uid": 0, "gid": 0}
    assert out["process"]["rlimits"] == [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    assert out["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert out["linux"]["uidMappings"] == [{"hostID": 0, "containerID": 0, "size": 1}]
    assert "terminal" not in out["process"]


def test_unknown_and_unsupported_keys_are_dropped() -> None:
    """Keys without a field are reported in `dropped` and left out."""
    config = realistic_config()
    config["linux"]["resources"]["rdma"] = {"mlx5_1": {"hcaHandles": 3}}
    config["linux"]["seccomp"]["listenerPath"] = "/run/seccomp.sock"
    config["mounts"][0]["uidMappings"] = []
    config["Version"] = "proto field names are not OCI keys"
    config["vm"] = {"kernel": {"path": "/k"}}
    dropped: list[str] = []
    out = spec_to_json(spec_from_json(config, dropped=dropped))
    assert sorted(dropped) == sorted(
        [
            "linux.resources.rdma",
            "linux.seccomp.listenerPath",
            "mounts[0].uidMappings",
            "Version",
            "vm",
        ]
    )
    assert out == without_zero_value_two(realistic_config())
    assert "linux.resources.rdma" in UNSUPPORTED_OCI_KEYS


def test_newer_spec_fields_are_carried() -> None:
    """The runtime-spec 1.0.2 to 1.3.0 fields the guest applies survive the
    protocol, zeros that mean something included (umask 0, idle 0, nice 0)."""
    config = realistic_config()
    config["ociVersion"] = "1.3.0"
    config["domainname"] = "example.org"
    config["process"]["user"]["umask"] = 0
    config["process"]["ioPriority"] = {"class": "IOPRIO_CLASS_BE", "priority": 0}
    config["process"]["scheduler"] = {"policy": "SCHED_OTHER", "nice": 0,
                                      "flags": ["SCHED_FLAG_RESET_ON_FORK"]}
    config["linux"]["personality"] = {"domain": "LINUX32"}
    config["linux"]["resources"]["unified"] = {"memory.high": "1073741824"}
    config["linux"]["resources"]["cpu"].update(burst=0, idle=0)
    config["linux"]["resources"]["memory"]["checkBeforeUpdate"] = True
    dropped: list[str] = []
    out = spec_to_json(spec_from_json(config, dropped=dropped))
    assert dropped == []
    assert out["domainname"] == "example.org"
    assert out["process"]["user"]["umask"] == 0
    assert out["process"]["ioPriority"] == {"class": "IOPRIO_CLASS_BE", "priority": 0}
    assert out["process"]["scheduler"] == {"policy": "SCHED_OTHER",
                                           "flags": ["SCHED_FLAG_RESET_ON_FORK"]}
    assert out["linux"]["personality"] == {"domain": "LINUX32"}
    assert out["linux"]["resources"]["unified"] == {"memory.high": "1073741824"}
    assert out["linux"]["resources"]["cpu"]["burst"] == 0
    assert out["linux"]["resources"]["cpu"]["idle"] == 0
    assert out["linux"]["resources"]["memory"]["checkBeforeUpdate"] is True


def test_null_means_absent() -> None:
    """JSON null values are treated like missing keys."""
    spec = spec_from_json({"ociVersion": "1.0.0", "process": None, "annotations": None})
    assert not spec.HasField("Process")
    assert spec_to_json(spec) == {"ociVersion": "1.0.0"}


def test_process_and_resources_documents() -> None:
    """Exec processes and resource updates convert like the parts of a full spec."""
    config = realistic_config()
    process = process_from_json(config["process"])
    assert message_to_json(process) == config["process"]
    resources = resources_from_json(config["linux"]["resources"])
    assert message_to_json(resources) == config["linux"]["resources"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["process"].update(args="sh"), "process.args: expected a list of strings"),
        (lambda c: c["process"]["args"].append(3), "process.args: expected a list of strings"),
        (lambda c: c.update(process=[]), "process: expected an object"),
        (lambda c: c.update(ociVersion=1), "ociVersion: expected a string"),
        (lambda c: c["root"].update(readonly="yes"), "root.readonly: expected a boolean"),
        (
            lambda c: c["process"]["user"].update(uid=-1),
            "process.user.uid: expected an unsigned 32-bit integer",
        ),
        (
            lambda c: c["process"]["user"].update(uid=True),
            "process.user.uid: expected an unsigned 32-bit integer",
        ),
        (
            lambda c: c["process"]["rlimits"][1].update(hard=2**64),
            "process.rlimits[1].hard: expected an unsigned 64-bit integer",
        ),
        (
            lambda c: c["linux"]["resources"]["memory"].update(limit="8G"),
            "linux.resources.memory.limit: expected a 64-bit integer",
        ),
        (
            lambda c: c["linux"]["resources"]["memory"].update(limit=1.5),
            "linux.resources.memory.limit: expected a 64-bit integer",
        ),
        (
            lambda c: c["mounts"][2].update(options="ro"),
            "mounts[2].options: expected a list of strings",
        ),
        (lambda c: c["mounts"].append("/tmp"), "mounts[3]: expected an object"),
        (lambda c: c.update(mounts={}), "mounts: expected a list of objects"),
        (
            lambda c: c["annotations"].update({"a.b": 1}),
            'annotations["a.b"]: expected a string',
        ),
        (lambda c: c.update(annotations=[]), "annotations: expected an object of strings"),
        (
            lambda c: c["linux"]["seccomp"]["syscalls"][3].update(errnoRet=-1),
            "linux.seccomp.syscalls[3].errnoRet: expected an unsigned 32-bit integer",
        ),
        (
            lambda c: c["process"]["user"].update(additionalGids=["wheel"]),
            "process.user.additionalGids: expected a list of unsigned 32-bit integers",
        ),
    ],
)
def test_malformed_input_names_the_path(mutate: Any, message: str) -> None:
    """Malformed documents raise InvalidSpecError that says where and what."""
    config = realistic_config()
    mutate(config)
    with pytest.raises(InvalidSpecError) as info:
        spec_from_json(config)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert info.value.path == message.split(":")[0]


def test_top_level_must_be_an_object() -> None:
    """A document that is not a JSON object is rejected."""
    bad: Any = ["not", "a", "spec"]
    with pytest.raises(InvalidSpecError, match="expected an object"):
        spec_from_json(bad)
