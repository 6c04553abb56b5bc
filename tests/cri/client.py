"""A small CRI client: the RuntimeService calls kubelet makes, over gRPC.

Built on grpcio's generic unary calls and pykata's own `runtime.v1` messages
(src/pykata/protocols/cri.proto), so no generated gRPC stubs are needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from pykata.protocols import cri_pb2 as cri

SERVICE = "/runtime.v1.RuntimeService"

R = TypeVar("R", bound=Message)


class CriError(Exception):
    """A CRI call that failed: the method, gRPC's status code and its details."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class CriClient:
    def __init__(self, socket: Path, timeout: float = 120.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{socket}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Message, response_type: type[R],
             timeout: float | None = None) -> R:
        """One unary call of RuntimeService; a failure raises CriError."""
        stub: Any = self._channel.unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            response: R = stub(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise CriError(method, exc.code(), exc.details() or "") from None
        return response

    # -- runtime ----------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self.call("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def status(self) -> cri.StatusResponse:
        return self.call("Status", cri.StatusRequest(), cri.StatusResponse)

    def wait_ready(self, timeout: float = 60.0) -> cri.StatusResponse:
        """Status, once containerd answers it (the CRI plugin starts after containerd)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("Status", cri.StatusRequest(), cri.StatusResponse, timeout=5)
            except CriError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # -- pods -------------------------------------------------------------------

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, handler: str = "") -> str:
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return self.call("RunPodSandbox", request, cri.RunPodSandboxResponse).pod_sandbox_id

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self.call("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                  cri.StopPodSandboxResponse)

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self.call("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                  cri.RemovePodSandboxResponse)

    def pod_sandbox_status(self, pod_id: str,
                           verbose: bool = False) -> cri.PodSandboxStatusResponse:
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self.call("PodSandboxStatus", request, cri.PodSandboxStatusResponse)

    def list_pod_sandbox(self) -> list[cri.PodSandbox]:
        return list(self.call("ListPodSandbox", cri.ListPodSandboxRequest(),
                              cri.ListPodSandboxResponse).items)

    # -- containers -------------------------------------------------------------

    def create_container(self, pod_id: str, config: cri.ContainerConfig,
                         sandbox_config: cri.PodSandboxConfig) -> str:
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                             sandbox_config=sandbox_config)
        return self.call("CreateContainer", request, cri.CreateContainerResponse).container_id

    def start_container(self, container_id: str) -> None:
        self.call("StartContainer", cri.StartContainerRequest(container_id=container_id),
                  cri.StartContainerResponse)

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        request = cri.StopContainerRequest(container_id=container_id, timeout=timeout)
        self.call("StopContainer", request, cri.StopContainerResponse,
                  timeout=self.timeout + timeout)

    def remove_container(self, container_id: str) -> None:
        self.call("RemoveContainer", cri.RemoveContainerRequest(container_id=container_id),
                  cri.RemoveContainerResponse)

    def container_status(self, container_id: str) -> cri.ContainerStatus:
        request = cri.ContainerStatusRequest(container_id=container_id)
        return self.call("ContainerStatus", request, cri.ContainerStatusResponse).status

    def exec_sync(self, container_id: str, cmd: Sequence[str],
                  timeout: int = 60) -> cri.ExecSyncResponse:
        """Run `cmd` in the container; containerd kills it after `timeout` seconds."""
        request = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        return self.call("ExecSync", request, cri.ExecSyncResponse, timeout=timeout + 30)
