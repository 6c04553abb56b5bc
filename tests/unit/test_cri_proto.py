"""pykata's subset of CRI's runtime.v1 messages: names and field numbers as in
Kubernetes' api.proto (k8s.io/cri-api), so containerd reads what kubelet would send."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor

from pykata.protocols import cri_pb2 as cri


def fields(message: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in message.fields}


def test_service_and_methods() -> None:
    service = cri.DESCRIPTOR.services_by_name["RuntimeService"]
    assert service.full_name == "runtime.v1.RuntimeService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    for name in ("RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus",
                 "ListPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
                 "RemoveContainer", "ContainerStatus", "ExecSync", "Status", "Version"):
        assert methods[name] == (f"{name}Request", f"{name}Response")


def test_pod_sandbox_fields() -> None:
    assert fields(cri.PodSandboxConfig.DESCRIPTOR) == {
        "metadata": 1, "hostname": 2, "log_directory": 3, "dns_config": 4,
        "port_mappings": 5, "labels": 6, "annotations": 7, "linux": 8}
    assert fields(cri.PortMapping.DESCRIPTOR) == {
        "protocol": 1, "container_port": 2, "host_port": 3, "host_ip": 4}
    assert fields(cri.LinuxPodSandboxConfig.DESCRIPTOR) == {
        "cgroup_parent": 1, "security_context": 2, "sysctls": 3}
    assert fields(cri.LinuxSandboxSecurityContext.DESCRIPTOR) == {
        "namespace_options": 1, "run_as_user": 3, "readonly_rootfs": 4,
        "supplemental_groups": 5, "privileged": 6, "run_as_group": 8}
    assert fields(cri.RunPodSandboxRequest.DESCRIPTOR) == {"config": 1, "runtime_handler": 2}
    assert fields(cri.PodSandboxStatus.DESCRIPTOR) == {
        "id": 1, "metadata": 2, "state": 3, "created_at": 4, "network": 5, "linux": 6,
        "labels": 7, "annotations": 8, "runtime_handler": 9}
    assert fields(cri.PodSandboxNetworkStatus.DESCRIPTOR) == {"ip": 1, "additional_ips": 2}
    assert cri.NamespaceMode.Value("NODE") == 2
    assert cri.PodSandboxState.Value("SANDBOX_NOTREADY") == 1


def test_container_fields() -> None:
    assert fields(cri.ContainerConfig.DESCRIPTOR) == {
        "metadata": 1, "image": 2, "command": 3, "args": 4, "working_dir": 5, "envs": 6,
        "mounts": 7, "labels": 9, "annotations": 10, "log_path": 11, "stdin": 12,
        "stdin_once": 13, "tty": 14, "linux": 15}
    assert fields(cri.LinuxContainerSecurityContext.DESCRIPTOR) == {
        "capabilities": 1, "privileged": 2, "namespace_options": 3, "run_as_user": 5,
        "run_as_username": 6, "readonly_rootfs": 7, "no_new_privs": 11, "run_as_group": 12}
    assert fields(cri.CreateContainerRequest.DESCRIPTOR) == {
        "pod_sandbox_id": 1, "config": 2, "sandbox_config": 3}
    status = fields(cri.ContainerStatus.DESCRIPTOR)
    assert (status["state"], status["exit_code"], status["reason"], status["log_path"]) == \
        (3, 7, 10, 15)
    assert fields(cri.ExecSyncResponse.DESCRIPTOR) == {"stdout": 1, "stderr": 2, "exit_code": 3}
    assert cri.ContainerState.Value("CONTAINER_EXITED") == 2


def test_wire_bytes() -> None:
    """A port mapping and a handler encode to the bytes upstream's numbers give."""
    request = cri.RunPodSandboxRequest(
        config=cri.PodSandboxConfig(port_mappings=[cri.PortMapping(
            protocol=cri.UDP, container_port=80, host_port=8080)]),
        runtime_handler="pykata")
    mapping = b"\x08\x01\x10\x50\x18\x90\x3f"  # protocol 1, container_port 80, host_port 8080
    config = b"\x2a" + bytes([len(mapping)]) + mapping  # field 5, length-delimited
    assert request.SerializeToString() == \
        b"\x0a" + bytes([len(config)]) + config + b"\x12\x06pykata"
