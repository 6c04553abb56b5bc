"""Fixtures of the CRI tests: the private containerd with its CRI plugin, a
client, pods per runtime handler, and the checks that nothing is left.

The tests are parametrized over the runtime handler (`runc`, the reference,
then `pykata`): the same test proves itself with runc. Pods that tests only
look into are shared per handler (a pykata pod boots a VM); a test that ends
a pod makes its own.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pykata.protocols import cri_pb2 as cri
from pykata.runtime.keys import pod_key
from pykata.runtime.paths import run_root
from tests.cri.client import CriClient, CriError
from tests.cri.cri_peer import BUSYBOX_IMAGE, NAMESPACE, RUNTIME_HANDLERS, CriPeer, reap_stale
from tests.functional.conftest import (  # noqa: F401 - pykata's session fixtures
    TEST_RUN_ROOTS,
    _clear_run_root,
    guest_assets,
    private_run_root,
    qemu_processes,
    require_root,
    session_config_text,
    unexpected_leftovers,
    without_shared_sandboxes,
)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "cri"
POD_NAMESPACE = "pykata-cri-test"  # the Kubernetes namespace in the pods' metadata
# A container that runs until told to stop, and stops at once when it is.
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


@pytest.fixture(scope="package")
def cri_peer(request: pytest.FixtureRequest) -> Iterator[CriPeer]:
    """containerd with the CRI plugin in a network namespace of its own, the
    pause and busybox images imported. On the way out: every pod removed, and
    no QEMU, shim, mount, pod network namespace or pykata state left."""
    request.getfixturevalue("guest_assets")
    # The shims inherit the session's own pykata run root from containerd.
    request.getfixturevalue("private_run_root")
    for owner in reap_stale():
        # The killed session's pykata state: its shims ran until just now.
        earlier = Path(str(owner.get("run_root") or ""))
        if earlier.parent == TEST_RUN_ROOTS and earlier.name != str(os.getpid()):
            _clear_run_root(earlier)
    peer = CriPeer(session_config_text())
    problems: list[str] = []
    try:
        peer.start()
        peer.import_images()
        yield peer
    finally:
        try:
            problems = _drain(peer)
        finally:
            peer.stop(keep_logs=ARTIFACTS)
        problems += peer.leftovers()
    assert not problems, "the CRI peer left this behind:\n" + "\n".join(problems)


def _drain(peer: CriPeer) -> list[str]:
    """Remove every pod still there, then list what remains of them while
    containerd still runs (its mount namespace ends with it)."""
    problems: list[str] = []
    if peer.proc is None or peer.proc.poll() is not None:
        return problems
    with CriClient(peer.socket, timeout=60) as client, contextlib.suppress(CriError):
        for pod in client.list_pod_sandbox():
            problems.append(f"pod still there at the end: {pod.metadata.name} ({pod.id})")
            with contextlib.suppress(CriError):
                client.stop_pod_sandbox(pod.id)
            with contextlib.suppress(CriError):
                client.remove_pod_sandbox(pod.id)
    # Shims, monitors and VMs go just after their pod's last task is deleted.
    deadline = time.monotonic() + 20
    while unexpected_leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    problems += [f"mount in containerd's namespace: {m}"
                 for m in without_shared_sandboxes(
                     peer.namespace_mounts(peer.base, run_root()))]
    problems += [f"pod network namespace: {p}" for p in peer.pod_netns()]
    problems += unexpected_leftovers()
    return problems


@pytest.fixture(scope="package")
def cri_client(cri_peer: CriPeer) -> Iterator[CriClient]:
    with CriClient(cri_peer.socket) as client:
        client.wait_ready()
        yield client


@pytest.fixture(scope="package", params=RUNTIME_HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- pods -------------------------------------------------------------------------


@dataclass
class Pod:
    """A pod sandbox made through CRI, with the containers made in it by name."""

    client: CriClient
    peer: CriPeer
    handler: str
    id: str
    config: cri.PodSandboxConfig
    containers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.metadata.name

    def status(self) -> cri.PodSandboxStatus:
        return self.client.pod_sandbox_status(self.id).status

    @property
    def ip(self) -> str:
        return self.status().network.ip

    @property
    def key(self) -> str:
        """pykata's key of this pod (its VM is named pykata-<key>)."""
        return pod_key(str(self.peer.socket), NAMESPACE, self.id)

    def qemu(self) -> list[str]:
        """The session's QEMU processes running this pod's VM."""
        return [line for line in qemu_processes() if f"pykata-{self.key} " in line + " "]

    def create(self, name: str, argv: Sequence[str], *, envs: dict[str, str] | None = None,
               working_dir: str = "",
               resources: cri.LinuxContainerResources | None = None) -> str:
        container_id = self.client.create_container(
            self.id, container_config(name, argv, envs=envs, working_dir=working_dir,
                                      resources=resources),
            self.config)
        self.containers[name] = container_id
        return container_id

    def start(self, name: str, argv: Sequence[str], **kwargs: object) -> str:
        """Create and start a container; return once CRI says it runs."""
        container_id = self.create(name, argv, **kwargs)  # type: ignore[arg-type]
        self.client.start_container(container_id)
        wait_state(self.client, container_id, cri.CONTAINER_RUNNING)
        return container_id

    def exec(self, name: str, argv: Sequence[str], timeout: int = 60) -> cri.ExecSyncResponse:
        return self.client.exec_sync(self.containers[name], argv, timeout=timeout)

    def sh(self, name: str, script: str, timeout: int = 60) -> cri.ExecSyncResponse:
        return self.exec(name, ["sh", "-c", script], timeout=timeout)

    def remove(self) -> None:
        """Stop and remove the pod (its containers go with it)."""
        with contextlib.suppress(CriError):
            self.client.stop_pod_sandbox(self.id)
        self.client.remove_pod_sandbox(self.id)


def pod_config(peer: CriPeer, name: str, *, hostname: str = "",
               dns: cri.DNSConfig | None = None,
               port_mappings: Sequence[tuple[int, int]] = ()) -> cri.PodSandboxConfig:
    """A pod's configuration as kubelet would send it (port_mappings: host
    port, container port, TCP)."""
    uid = uuid.uuid4().hex
    log_directory = peer.logs / f"{POD_NAMESPACE}_{name}_{uid}"
    log_directory.mkdir(parents=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE),
        hostname=hostname or name,
        log_directory=str(log_directory),
        dns_config=dns,
        port_mappings=[cri.PortMapping(protocol=cri.TCP, host_port=host, container_port=port)
                       for host, port in port_mappings],
        labels={"pykata.test/suite": "cri"},
        annotations={"pykata.test/pod": name},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=peer.cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD)),
        ),
    )


def container_config(name: str, argv: Sequence[str], *, envs: dict[str, str] | None = None,
                     working_dir: str = "",
                     resources: cri.LinuxContainerResources | None = None
                     ) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=BUSYBOX_IMAGE),
        command=list(argv),
        working_dir=working_dir,
        envs=[cri.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        labels={"pykata.test/container": name},
        log_path=f"{name}.log",
        linux=cri.LinuxContainerConfig(
            resources=resources,
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD))),
    )


def wait_state(client: CriClient, container_id: str, state: cri.ContainerState.ValueType,
               timeout: float = 60) -> cri.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = client.container_status(container_id)
        if status.state == state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"container {status.metadata.name} is "
                                 f"{cri.ContainerState.Name(status.state)}, not "
                                 f"{cri.ContainerState.Name(state)} after {timeout} s "
                                 f"({status.reason} {status.message})")
        time.sleep(0.1)


PodFactory = Callable[..., Pod]


@pytest.fixture(scope="package")
def make_pod(cri_peer: CriPeer, cri_client: CriClient) -> Iterator[PodFactory]:
    """Run a pod with a handler; the pods still there at the end are removed."""
    made: list[Pod] = []

    def make(name: str, handler: str, **kwargs: object) -> Pod:
        config = pod_config(cri_peer, name, **kwargs)  # type: ignore[arg-type]
        pod_id = cri_client.run_pod_sandbox(config, handler)
        pod = Pod(cri_client, cri_peer, handler, pod_id, config)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        with contextlib.suppress(CriError):
            pod.remove()


def is_not_found(exc: CriError) -> bool:
    return bool(exc.code == grpc.StatusCode.NOT_FOUND)
