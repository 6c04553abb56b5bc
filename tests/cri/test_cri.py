"""Kubernetes' CRI through containerd 1.6's CRI plugin, with each runtime handler.

Every test runs with `runc` first (the reference: the test proves itself)
and then with `pykata`, where each pod is a VM. The calls are the ones
kubelet makes; the pods sit on a CNI bridge inside the peer's own network
namespace (see cri_peer.py).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata.assets.busybox_image import BUSYBOX
from pykata.host.cgroups import host_layout
from pykata.protocols import cri_pb2 as cri
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import read_sandbox_state
from tests.cri.client import CriClient, CriError
from tests.cri.conftest import IDLE, Pod, PodFactory, is_not_found, wait_state
from tests.cri.cri_peer import GATEWAY, GATEWAY_NAME, SMALL_MEMORY, SUBNET, CriPeer

MIB = 1024 * 1024
SERVER_PORT = 8080
HOST_PORT = 18080
GREETING = "hello from pod a"
DNS = cri.DNSConfig(servers=["10.88.77.254"], searches=["pykata.test", "svc.pykata.test"],
                    options=["ndots:2"])
# busybox's httpd serving GREETING (from the environment) on SERVER_PORT.
SERVER = ["sh", "-c", "mkdir -p /tmp/www && echo \"$GREETING\" > /tmp/www/index.html && "
          f"exec httpd -f -p {SERVER_PORT} -h /tmp/www"]


def wget(url: str, seconds: int = 10, busybox: str = "") -> list[str]:
    """busybox wget of url within a time limit (its own -T crashes in Debian's
    busybox 1.35); outside the image, `busybox` names the binary."""
    return ["timeout", str(seconds), *([busybox] if busybox else []), "wget", "-q", "-O-", url]


def shown(result: cri.ExecSyncResponse) -> str:
    """An ExecSync result for an assertion message."""
    return (f"exit code {result.exit_code}, stdout {result.stdout.decode(errors='replace')!r}, "
            f"stderr {result.stderr.decode(errors='replace')!r}")


def fetched(result: cri.ExecSyncResponse) -> tuple[int, str]:
    return result.exit_code, result.stdout.decode(errors="replace").strip()


def in_subnet(address: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(SUBNET)


@dataclass
class PodPair:
    """Two running pods of one handler: `a` serves GREETING over HTTP from its
    container `web` (with a host port), and has a second container `side`;
    `b` is a client with one container `main`."""

    a: Pod
    b: Pod


@pytest.fixture(scope="package")
def pods(handler: str, make_pod: PodFactory) -> Iterator[PodPair]:
    a = make_pod("pod-a", handler, hostname="pod-a", dns=DNS,
                 port_mappings=[(HOST_PORT, SERVER_PORT)])
    b = make_pod("pod-b", handler)
    try:
        a.start("web", SERVER, envs={"GREETING": GREETING})
        a.start("side", IDLE)
        b.start("main", IDLE)
        _wait_serving(a)
        yield PodPair(a, b)
    finally:
        for pod in (a, b):
            pod.remove()


def _wait_serving(pod: Pod, timeout: float = 30) -> None:
    """Until the server of `web` listens (netstat: no connection is made, so
    the tests of the network fail on their own)."""
    deadline = time.monotonic() + timeout
    while True:
        result = pod.exec("web", ["netstat", "-ltn"])
        if f":{SERVER_PORT} " in result.stdout.decode():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the server of {pod.name} does not listen: "
                                 f"{result.stdout.decode(errors='replace')}")
        time.sleep(0.2)


# -- the runtime --------------------------------------------------------------------


def test_runtime_and_network_ready(cri_client: CriClient) -> None:
    assert cri_client.version().runtime_api_version == "v1"
    conditions = {c.type: c.status for c in cri_client.status().status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}


def test_unknown_handler_is_refused(cri_peer: CriPeer, make_pod: PodFactory) -> None:
    with pytest.raises(CriError) as failed:
        make_pod("no-such-handler", "no-such-handler")
    assert "no-such-handler" in failed.value.details


# -- one pod, from start to end -----------------------------------------------------


def test_pod_lifecycle(handler: str, make_pod: PodFactory, cri_client: CriClient) -> None:
    """RunPodSandbox, containers created, started, exec'd into, exiting with a
    code, stopped; the pod stopped and removed."""
    pod = make_pod("lifecycle", handler)
    status = pod.status()
    assert status.state == cri.SANDBOX_READY
    assert status.metadata.name == "lifecycle"
    assert status.runtime_handler == handler
    assert in_subnet(status.network.ip), status.network
    assert status.annotations["pykata.test/pod"] == "lifecycle"
    if handler.startswith("pykata"):
        assert len(pod.qemu()) == 1, "the pod's VM is not running"
        boot = read_sandbox_state(SandboxPaths.for_key(pod.key)).boot
        assert boot == ("template" if handler == "pykata-template" else "cold"), boot

    main = pod.start("main", IDLE)
    running = cri_client.container_status(main)
    assert running.state == cri.CONTAINER_RUNNING
    assert running.started_at > 0 and running.finished_at == 0
    assert running.labels["pykata.test/container"] == "main"

    result = pod.sh("main", "echo out; echo err >&2; exit 7")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 7), \
        shown(result)

    quick = pod.create("quick", ["sh", "-c", "exit 3"])
    assert cri_client.container_status(quick).state == cri.CONTAINER_CREATED
    cri_client.start_container(quick)
    exited = wait_state(cri_client, quick, cri.CONTAINER_EXITED)
    assert exited.exit_code == 3
    assert exited.finished_at > 0

    cri_client.stop_container(main, timeout=10)
    stopped = wait_state(cri_client, main, cri.CONTAINER_EXITED)
    assert stopped.exit_code == 0, "the TERM trap did not run"
    for container in (main, quick):
        cri_client.remove_container(container)
        with pytest.raises(CriError) as gone:
            cri_client.container_status(container)
        assert is_not_found(gone.value)

    cri_client.stop_pod_sandbox(pod.id)
    assert pod.status().state == cri.SANDBOX_NOTREADY
    cri_client.remove_pod_sandbox(pod.id)
    with pytest.raises(CriError) as removed:
        pod.status()
    assert is_not_found(removed.value)
    assert pod.id not in [p.id for p in cri_client.list_pod_sandbox()]
    deadline = time.monotonic() + 20
    while pod.qemu() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pod.qemu(), "the pod's VM outlived the pod"


# -- networking ---------------------------------------------------------------------


def test_pod_ips_in_subnet(pods: PodPair) -> None:
    ips = [pods.a.ip, pods.b.ip]
    assert all(in_subnet(ip) for ip in ips), ips
    assert ips[0] != ips[1]
    listing = {p.id: p for p in pods.a.client.list_pod_sandbox()}
    assert {pods.a.id, pods.b.id} <= listing.keys()
    assert listing[pods.a.id].state == cri.SANDBOX_READY


def test_pod_sees_its_address(pods: PodPair) -> None:
    result = pods.a.exec("web", ["ip", "-o", "-4", "addr", "show"])
    assert result.exit_code == 0, shown(result)
    assert f"inet {pods.a.ip}/24" in result.stdout.decode(), shown(result)


def test_pods_reach_each_other_by_ip(pods: PodPair) -> None:
    result = pods.b.exec("main", wget(f"http://{pods.a.ip}:{SERVER_PORT}/"))
    assert fetched(result) == (0, GREETING), shown(result)


def test_host_port_reaches_the_pod(pods: PodPair, cri_peer: CriPeer) -> None:
    """portmap forwards the host port of the node (the peer's namespace, on
    the bridge's address) to the pod."""
    result = cri_peer.in_netns(*wget(f"http://{GATEWAY}:{HOST_PORT}/", busybox=str(BUSYBOX)),
                               timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, GREETING), \
        f"exit code {result.returncode}, stderr {result.stderr!r}"


# -- names --------------------------------------------------------------------------


def test_hostname(pods: PodPair) -> None:
    result = pods.a.exec("web", ["hostname"])
    assert result.stdout.decode().strip() == "pod-a"


def test_hosts_file_resolves(pods: PodPair) -> None:
    """CRI gives the pod a copy of the node's /etc/hosts; names in it resolve."""
    hosts = pods.a.exec("web", ["cat", "/etc/hosts"]).stdout.decode()
    entries: dict[str, list[str]] = {}
    for line in hosts.splitlines():
        address, *names = line.split("#")[0].split() or [""]
        for name in names:
            entries.setdefault(name, []).append(address)
    assert entries.get("localhost", [""])[0] == "127.0.0.1", hosts
    assert entries.get(GATEWAY_NAME) == [GATEWAY], hosts
    gateway = pods.a.exec("web", ["ping", "-c", "1", "-W", "5", GATEWAY_NAME])
    assert f"({GATEWAY})" in gateway.stdout.decode(), shown(gateway)
    assert gateway.exit_code == 0, f"no reply from {GATEWAY_NAME}: {shown(gateway)}"
    local = pods.a.exec("web", ["ping", "-c", "1", "-W", "5", "localhost"])
    assert "(127.0.0.1)" in local.stdout.decode(), shown(local)
    assert local.exit_code == 0, f"no reply from localhost: {shown(local)}"


def test_resolv_conf_has_the_dns_config(pods: PodPair) -> None:
    text = pods.a.exec("web", ["cat", "/etc/resolv.conf"]).stdout.decode()
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert [w[1] for w in lines if w[0] == "nameserver"] == list(DNS.servers), text
    assert [w[1:] for w in lines if w[0] == "search"] == [list(DNS.searches)], text
    assert [w[1:] for w in lines if w[0] == "options"] == [list(DNS.options)], text


# -- two containers, one pod --------------------------------------------------------


def test_containers_of_a_pod_share_its_network(pods: PodPair) -> None:
    """Both containers of pod a see the same interfaces and addresses, and
    `side` reaches the server of `web` on 127.0.0.1."""
    script = "ip -o addr show; ip -o link show"
    web, side = (pods.a.sh(name, script) for name in ("web", "side"))
    assert web.exit_code == side.exit_code == 0, (shown(web), shown(side))
    assert sorted(web.stdout.decode().splitlines()) == sorted(side.stdout.decode().splitlines())
    assert pods.a.ip in web.stdout.decode()
    result = pods.a.exec("side", wget(f"http://127.0.0.1:{SERVER_PORT}/"))
    assert fetched(result) == (0, GREETING), f"from side to 127.0.0.1: {shown(result)}"


def test_a_pod_is_one_vm_with_pykata_and_none_with_runc(pods: PodPair, handler: str) -> None:
    """With pykata the pod's containers share one VM: one QEMU for pod a, one
    for pod b, whatever the number of containers, and both containers run on
    one kernel that is not the host's. With runc: no VM, the host's kernel."""
    boot_id = "cat /proc/sys/kernel/random/boot_id"
    ids = {pods.a.sh(name, boot_id).stdout.decode().strip() for name in ("web", "side")}
    with open("/proc/sys/kernel/random/boot_id") as f:
        host = f.read().strip()
    assert len(ids) == 1, ids
    if handler.startswith("pykata"):
        assert len(pods.a.qemu()) == 1, pods.a.qemu()
        assert len(pods.b.qemu()) == 1, pods.b.qemu()
        assert host not in ids, (ids, host)
    else:
        assert not pods.a.qemu() and not pods.b.qemu()
        assert ids == {host}, (ids, host)


def test_a_handlers_config_path_chooses_pykatas_configuration(make_pod: PodFactory) -> None:
    """containerd passes the handler's options (runtimeoptions.v1.Options) with
    each task; the shim boots the pod with the configuration ConfigPath names."""
    pod = make_pod("small", "pykata-small")
    try:
        (vm,) = pod.qemu()
        # The guest's RAM: the machine's own, or NUMA node 0 when the root
        # image is mapped after it (-m then counts the image too).
        ram = re.search(r"id=pykata-ram,size=(\d+)M", vm) or re.search(r" -m (\d+)M ", vm)
        assert ram is not None and int(ram.group(1)) == SMALL_MEMORY, vm
    finally:
        pod.remove()


def _sandbox_cgroup(pod: Pod, controller: str) -> Path:
    """The pod sandbox's cgroup (the kubelet's parent, then the sandbox id)."""
    hierarchy = next(h for h in host_layout().hierarchies if h.has(controller))
    return hierarchy.mount / pod.peer.cgroup_parent.lstrip("/") / pod.id


def test_a_pods_sandbox_cgroup_holds_its_vm_sized_as_its_containers(
        handler: str, make_pod: PodFactory) -> None:
    """With pykata the sandbox cgroup the kubelet names holds the pod's QEMU,
    limited to the sum of its live containers' limits and the configured
    overhead (50 millicpus, 256 MiB), following each container's create and
    removal.
    With runc it holds the pause process, unlimited."""
    pod = make_pod("sized", handler)
    try:
        half = cri.LinuxContainerResources(cpu_period=100_000, cpu_quota=50_000,
                                           memory_limit_in_bytes=256 * MIB)
        quarter = cri.LinuxContainerResources(cpu_period=100_000, cpu_quota=25_000,
                                              memory_limit_in_bytes=128 * MIB)
        # An init container that has exited asks for nothing more (the
        # kubelet's rule): had it been counted, the sums below would differ.
        whole = cri.LinuxContainerResources(cpu_period=100_000, cpu_quota=100_000,
                                            memory_limit_in_bytes=300 * MIB)
        init = pod.create("init", ["true"], resources=whole)
        pod.client.start_container(init)
        wait_state(pod.client, init, cri.CONTAINER_EXITED)
        pod.start("one", IDLE, resources=half)
        pod.start("two", IDLE, resources=quarter)
        cpu, memory = _sandbox_cgroup(pod, "cpu"), _sandbox_cgroup(pod, "memory")
        procs = {int(p) for p in (memory / "cgroup.procs").read_text().split()}
        assert procs, f"nothing in {memory}"
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        limit = int((memory / "memory.limit_in_bytes").read_text())
        if not handler.startswith("pykata"):
            assert not pod.qemu() and quota == -1, quota
            return
        (vm,) = pod.qemu()
        assert int(vm.split()[0]) in procs, (vm, procs)
        assert (quota, limit) == (80_000, 640 * MIB)
        pod.client.stop_container(pod.containers["two"], 10)
        pod.client.remove_container(pod.containers.pop("two"))
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 55_000
        assert int((memory / "memory.limit_in_bytes").read_text()) == 512 * MIB
    finally:
        pod.remove()
    assert not any(_sandbox_cgroup(pod, c).exists() for c in ("cpu", "memory"))
