"""`pykata monitor`'s parts with fakes: the agent's /proc parsers, the host's
check of a hostile GetMetrics reply, the owner's RPC histogram, the families,
and a scrape of fake owners (one answering, one stuck, one gone) over real
ttRPC sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from pykata.agent import guest_metrics as agent_side
from pykata.channels import AGENT_SERVICE, CONTROL_SERVICE
from pykata.errors import ConfigError
from pykata.metrics import collector as collector_mod
from pykata.metrics import server as server_mod
from pykata.metrics.collector import PodCollector
from pykata.metrics.discovery import find_pods
from pykata.metrics.families import PodFigures, pod_families
from pykata.metrics.procfs import process_figures
from pykata.metrics.scrape import scrape
from pykata.metrics.server import is_wildcard, listener, make_app, parse_listen
from pykata.protocols import agent_pb2, pod_pb2
from pykata.runtime import guest_metrics
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.pod_metrics import RPC_BOUNDS, RpcTimes
from pykata.runtime.state import SandboxState, process_start_time, write_state
from pykata.ttrpc import RequestContext, Server

# --- the agent's side: /proc as the guest's kernel writes it -----------------

MEMINFO = ("MemTotal:         502152 kB\nMemFree:          440000 kB\nHugePages_Total: 0\n"
           "Shmem:               0 kB\n")
STAT = "cpu  200 0 100 5000 10 0 3 0 0 0\ncpu0 200 0 100 5000 10 0 3 0 0 0\n"
NET_DEV = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs\n"
    "    lo: 120 2 0 0 0 0 0 0 120 2 0 0 0 0 0 0\n"
    "  eth0: 9000 30 1 0 0 0 0 0 7000 20 2 0 0 0 0 0\n")
DISKSTATS = """   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 10 0 80 5 4 0 16 2 0 7 7
"""


def test_agent_parsers_read_procs_formats() -> None:
    """The agent's parsers turn /proc's text into the reply's units."""
    assert agent_side.memory_bytes(MEMINFO) == {  # the fields of the fixed list only
        "MemTotal": 502152 * 1024, "MemFree": 440000 * 1024, "Shmem": 0}
    cpu = agent_side.cpu_seconds(STAT, 100)
    assert cpu["user"] == 2.0 and cpu["idle"] == 50.0 and cpu["softirq"] == 0.03
    ifaces = {i.name: i for i in agent_side.interfaces(NET_DEV)}
    assert ifaces["eth0"].rx_bytes == 9000 and ifaces["eth0"].tx_packets == 20
    assert ifaces["eth0"].rx_errors == 1 and ifaces["eth0"].tx_errors == 2
    disks = agent_side.disks(DISKSTATS)
    assert [d.name for d in disks] == ["vda"]  # ram disks say nothing of the workload
    assert disks[0].read_bytes == 80 * 512 and disks[0].written_bytes == 16 * 512


def test_agent_reads_its_own_process_here() -> None:
    """On a real /proc (this host's) every figure the agent sends is there."""
    reply = agent_side.guest_metrics()
    assert reply.memory_bytes["MemTotal"] > 0
    assert reply.agent_resident_bytes > 0 and reply.agent_open_fds > 0
    assert reply.agent_threads >= 1 and reply.cpu_seconds["idle"] > 0


# --- the host's check of what the guest sends ------------------------------

def hostile_reply() -> agent_pb2.GuestMetrics:
    """Everything a hostile guest could put into a GetMetrics reply."""
    reply = agent_pb2.GuestMetrics(load1=float("nan"), load5=-3.0, load15=1e300,
                                   agent_cpu_seconds=float("inf"),
                                   agent_resident_bytes=(1 << 64) - 1)
    reply.cpu_seconds["user"] = -5.0
    reply.cpu_seconds['evil"} 1\nforged_metric{a="'] = 1.0
    reply.cpu_seconds["system"] = float("nan")
    for n in range(1000):
        reply.memory_bytes[f"Field{n}"] = n
    reply.memory_bytes['Mem\n"}'] = 1
    reply.memory_bytes["MemTotal"] = 1 << 60
    reply.interfaces.add(name='eth0"}\nforged 1', rx_bytes=1)
    reply.interfaces.add(name="\x1b[31mred", rx_bytes=1)
    reply.interfaces.add(name="eth0", rx_bytes=5)
    reply.interfaces.add(name="eth0", rx_bytes=99)  # a second eth0
    for n in range(10_000):
        reply.interfaces.add(name=f"x{n}", rx_bytes=(1 << 64) - 1)
    reply.disks.add(name="../../etc", read_bytes=1)
    reply.disks.add(name="a" * 100, read_bytes=1)
    reply.disks.add(name="vda", read_bytes=(1 << 64) - 1)
    return reply


def test_a_hostile_reply_is_bounded_clamped_and_its_bad_names_dropped() -> None:
    """Names that are not device or meminfo names are dropped (never escaped
    into a label), lists are cut, numbers clamped, repeats keep the first."""
    out = guest_metrics.checked(hostile_reply())
    assert (out.load1, out.load5, out.load15) == (0.0, 0.0, guest_metrics.MAX_LOAD)
    assert out.agent_cpu_seconds == 0.0
    assert out.agent_resident_bytes == guest_metrics.MAX_COUNT
    assert dict(out.cpu_seconds) == {"user": 0.0, "system": 0.0}
    assert dict(out.memory_bytes) == {"MemTotal": guest_metrics.MAX_COUNT}  # listed only
    assert len(out.interfaces) <= guest_metrics.MAX_INTERFACES
    names = [i.name for i in out.interfaces]
    assert names[0] == "eth0" and names.count("eth0") == 1
    assert out.interfaces[0].rx_bytes == 5
    assert all(i.rx_bytes <= guest_metrics.MAX_COUNT for i in out.interfaces)
    assert [d.name for d in out.disks] == ["vda"]
    assert out.disks[0].read_bytes == guest_metrics.MAX_COUNT


class _HostileAgent:
    """A ttRPC agent that answers GetMetrics with `hostile_reply()`."""

    async def GetMetrics(self, req: Any, ctx: RequestContext) -> agent_pb2.GuestMetrics:
        return hostile_reply()


def test_the_agent_client_checks_a_hostile_reply_on_the_wire() -> None:
    """Through a real ttRPC connection: AgentClient.guest_metrics hands on
    only the checked reply, and the scrape text it becomes has no forged
    series and no control characters."""
    async def run() -> agent_pb2.GuestMetrics:
        host, guest = socket.socketpair()
        server = Server()
        server.register(AGENT_SERVICE, "GetMetrics", agent_pb2.GetMetricsRequest,
                        _HostileAgent().GetMetrics)
        serving = asyncio.ensure_future(
            server.serve_connection(*await asyncio.open_connection(sock=guest)))
        agent = await AgentClient.over_socket(host)
        try:
            return await agent.guest_metrics()
        finally:
            await agent.close()
            await server.aclose()
            await serving

    guest = asyncio.run(run())
    assert len(guest.interfaces) <= guest_metrics.MAX_INTERFACES
    metrics = pod_pb2.PodMetrics(id="p1", front_end="run", boot="cold", has_guest=True)
    metrics.guest.CopyFrom(guest)
    text = _exposition([PodFigures(metrics, None, None)])
    assert "forged" not in text and "\x1b" not in text and "evil" not in text
    assert 'pykata_guest_network_receive_bytes_total{interface="eth0",sandbox_id="p1"} 5.0' \
        in text


def test_the_families_check_the_guest_figures_again() -> None:
    """An owner that passed a hostile reply on unchecked (a bug, an older
    owner) still cannot forge series: the monitor checks again."""
    metrics = pod_pb2.PodMetrics(id="p1", has_guest=True)
    metrics.guest.CopyFrom(hostile_reply())
    text = _exposition([PodFigures(metrics, None, None)])
    assert "forged" not in text and "\x1b" not in text
    assert text.count("pykata_guest_network_receive_bytes_total{") \
        <= guest_metrics.MAX_INTERFACES


# --- the owner's histogram ---------------------------------------------------

def test_rpc_times_counts_each_call_in_its_bucket_and_counts_errors() -> None:
    times = RpcTimes()
    times.observe("StartContainer", 0.003, None)
    times.observe("StartContainer", 0.2, RuntimeError("failed"))
    times.observe("StartContainer", 1e9, None)  # beyond the last finite bound
    times.observe("Check", 0.0, None)
    by_method = {m.method: m for m in times.messages()}
    start = by_method["StartContainer"]
    assert len(start.buckets) == len(RPC_BOUNDS)
    assert start.buckets[RPC_BOUNDS.index(0.0025)] == 0
    assert start.buckets[RPC_BOUNDS.index(0.005)] == 1
    assert start.buckets[RPC_BOUNDS.index(0.25)] == 2
    assert start.buckets[RPC_BOUNDS.index(60.0)] == 2 and start.buckets[-1] == 3
    assert start.errors == 1 and start.sum_seconds == pytest.approx(1e9 + 0.203)
    assert by_method["Check"].buckets[0] == 1


def test_rpc_times_keeps_a_bounded_number_of_methods() -> None:
    times = RpcTimes()
    for n in range(500):
        times.observe(f"M{n}", 0.1, None)
    assert len(times.messages()) == 64


# --- families, rendered as Prometheus reads them -----------------------------

class _Fixed(Collector):
    def __init__(self, pods: list[PodFigures]) -> None:
        self.pods = pods

    def collect(self) -> Iterator[Any]:
        return pod_families(self.pods)


def _exposition(pods: list[PodFigures]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(pods))
    return generate_latest(registry).decode()


def test_families_carry_sandbox_and_container_labels_and_units() -> None:
    times = RpcTimes()
    times.observe("CreateContainer", 0.3, None)
    metrics = pod_pb2.PodMetrics(id="p1", front_end="oci", boot="template",
                                 rpc_bounds=RPC_BOUNDS, rpcs=times.messages(),
                                 start_seconds={"vm_launch": 0.5, "agent_ready": 2.0},
                                 containers={"c1": "running"})
    me = process_figures(os.getpid())
    assert me is not None and me.resident_bytes > 0 and me.threads >= 1
    text = _exposition([PodFigures(metrics, me, me)])
    assert 'pykata_pod_info{front_end="oci",sandbox_id="p1",source="template"} 1.0' in text
    assert 'pykata_container_info{container_id="c1",sandbox_id="p1",status="running"}' \
        in text
    assert ('pykata_pod_start_seconds{phase="agent_ready",sandbox_id="p1",'
            'source="template"} 2.0') in text
    assert ('pykata_shim_agent_rpc_duration_seconds_bucket{le="0.5",method="CreateContainer",'
            'sandbox_id="p1"} 1.0') in text
    assert ('pykata_shim_agent_rpc_duration_seconds_bucket{le="0.25",method="CreateContainer",'
            'sandbox_id="p1"} 0.0') in text
    for family in ("hypervisor", "shim"):
        for name in ("cpu_seconds_total", "resident_memory_bytes",
                     "proportional_memory_bytes", "threads", "open_fds",
                     "io_read_bytes_total", "io_write_bytes_total"):
            assert f'pykata_{family}_{name}{{sandbox_id="p1"}}' in text, name
    assert 'pykata_guest_up{sandbox_id="p1"} 0.0' in text
    assert "pykata_guest_memory_bytes{" not in text  # no guest figures: none made up


def test_a_process_that_is_gone_has_no_figures(tmp_path: Path) -> None:
    assert process_figures(1 << 30) is None


# --- a scrape of fake owners over real sockets --------------------------------

def _record(root: Path, key: str) -> Path:
    """A sandbox record whose owner is this test (alive), like an owner's."""
    run_dir = root / "sandboxes" / key
    run_dir.mkdir(parents=True)
    socket_path = run_dir / "control.sock"
    write_state(run_dir / "state.json", SandboxState(
        id=key, key=key, front_end="run", owner_pid=os.getpid(),
        owner_start=process_start_time(os.getpid()), console_log="", created=time.time(),
        control_socket=str(socket_path), status="running"))
    return socket_path


async def _owner(path: Path, *, stuck: bool = False) -> Server:
    async def metrics(req: pod_pb2.MetricsRequest, ctx: RequestContext
                      ) -> pod_pb2.PodMetrics:
        if stuck:
            await asyncio.sleep(3600)
        return pod_pb2.PodMetrics(id=path.parent.name, front_end="run", boot="cold",
                                  has_guest=not req.skip_guest)

    server = Server()
    server.register(CONTROL_SERVICE, "Metrics", pod_pb2.MetricsRequest, metrics)
    await server.serve_unix(path)
    return server


def test_a_stuck_and_a_gone_owner_are_skipped_within_the_deadline(tmp_path: Path) -> None:
    """Three pods: one answers, one's owner never answers, one's socket is
    gone. The scrape takes about one deadline, not the stuck pod's time, and
    reports the two it skipped."""
    good, stuck, _gone = (_record(tmp_path, k) for k in ("good", "stuck", "gone"))

    async def run() -> tuple[Any, float]:
        servers = [await _owner(good), await _owner(stuck, stuck=True)]
        try:
            pods = find_pods(tmp_path)
            started = time.monotonic()
            result = await scrape(pods, timeout=0.5)
            return result, time.monotonic() - started
        finally:
            for server in servers:
                await server.aclose()

    result, seconds = asyncio.run(run())
    assert [a.pod.id for a in result.answers] == ["good"]
    assert set(result.skipped) == {"stuck", "gone"}
    assert seconds < 1.5, seconds


def test_the_collector_counts_skipped_pods_across_scrapes(tmp_path: Path) -> None:
    """pykata_monitor_scrape_failures_total grows by the pods each scrape
    skipped; pykata_running_pods counts every pod whose owner runs."""
    _record(tmp_path, "gone1")
    _record(tmp_path, "gone2")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(tmp_path, pod_timeout=0.2, reuse_seconds=0))
    generate_latest(registry)
    text = generate_latest(registry).decode()
    assert "pykata_running_pods 2.0" in text
    assert "pykata_monitor_scrape_failures_total 4.0" in text
    assert "pykata_monitor_scrape_duration_seconds " in text


def test_an_owner_that_is_gone_is_not_a_pod(tmp_path: Path) -> None:
    """A record whose owner died (a stale pod) is not asked nor counted."""
    run_dir = tmp_path / "sandboxes" / "dead"
    run_dir.mkdir(parents=True)
    write_state(run_dir / "state.json", SandboxState(
        id="dead", key="dead", front_end="run", owner_pid=1 << 22, owner_start=1,
        console_log="", created=0.0, control_socket=str(run_dir / "control.sock")))
    (tmp_path / "sandboxes" / "junk").mkdir()
    assert find_pods(tmp_path) == []


# --- the listener ------------------------------------------------------------

def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen("[::1]:9") == ("::1", 9)
    for bad in ("localhost:8090", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:x", ":8090"):
        with pytest.raises(ConfigError, match="ADDR:PORT"):
            parse_listen(bad)


def test_sandboxes_lists_the_pods_as_json(tmp_path: Path) -> None:
    _record(tmp_path, "p1")
    app = make_app(tmp_path)
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": "/sandboxes", "REQUEST_METHOD": "GET"},
                        lambda status, headers: seen.append(status)))
    assert seen == ["200 OK"]
    entries = json.loads(body)
    assert [(e["id"], e["front_end"], e["owner_pid"]) for e in entries] == [
        ("p1", "run", os.getpid())]
    body = b"".join(app({"PATH_INFO": "/nothing", "REQUEST_METHOD": "GET"},
                        lambda status, headers: seen.append(status)))
    assert seen[-1].startswith("404") and b"/metrics" in body


def test_the_systemd_unit_runs_the_monitor_on_loopback() -> None:
    """deploy/pykata-monitor.service starts a command line pykata accepts,
    listening on loopback (what the README promises)."""
    from pykata.cli.main import build_parser

    unit = (Path(__file__).parents[2] / "deploy" / "pykata-monitor.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.partition("=")[2].split()
    assert argv[0] == "/usr/local/bin/pykata"
    args = build_parser().parse_args(argv[1:])
    assert args.verb == "monitor"
    assert parse_listen(args.listen)[0] == "127.0.0.1"


def test_no_guest_asks_the_owners_to_leave_the_guest_out(tmp_path: Path) -> None:
    """--no-guest: the owners are told to skip the agent call, and no
    pykata_guest_up is made up for pods whose guest was not asked."""
    good = _record(tmp_path, "good")

    async def run(guest: bool) -> str:
        server = await _owner(good)
        try:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(PodCollector(tmp_path, pod_timeout=2.0, guest=guest))
            return (await asyncio.to_thread(generate_latest, registry)).decode()
        finally:
            await server.aclose()

    assert 'pykata_guest_up{sandbox_id="good"} 1.0' in asyncio.run(run(True))
    without = asyncio.run(run(False))
    assert 'pykata_pod_info{front_end="run",sandbox_id="good",source="cold"} 1.0' in without
    assert "pykata_guest_up{" not in without


def test_sandboxes_says_which_pods_run_older_guest_assets(tmp_path: Path) -> None:
    """/sandboxes judges each pod's recorded kernel and initrd against the
    ones a pod started now would boot: current, stale, or unknown."""
    from pykata.runtime.staleness import GuestAssets

    for key, initrd in (("now", "/cache/initrd-new"), ("old", "/cache/initrd-old"),
                        ("before", "")):
        run_dir = tmp_path / "sandboxes" / key
        run_dir.mkdir(parents=True)
        write_state(run_dir / "state.json", SandboxState(
            id=key, key=key, front_end="run", owner_pid=os.getpid(),
            owner_start=process_start_time(os.getpid()), console_log="", created=time.time(),
            control_socket=str(run_dir / "control.sock"), status="running",
            guest_kernel="/cache/kernel" if initrd else "", guest_initrd=initrd))
    app = make_app(tmp_path, assets=lambda: GuestAssets("/cache/kernel", "/cache/initrd-new"))
    body = b"".join(app({"PATH_INFO": "/sandboxes", "REQUEST_METHOD": "GET"},
                        lambda status, headers: None))
    verdicts = {e["id"]: (e["assets"], e["assets_detail"]) for e in json.loads(body)}
    assert verdicts["now"][0] == "current"
    assert verdicts["old"][0] == "stale" and "/cache/initrd-old" in verdicts["old"][1]
    assert verdicts["before"][0] == "unknown"


# --- what anyone who reaches the listener can make the monitor do ------------

def test_concurrent_scrapes_share_one_and_reuse_it_for_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight requests at once cost one scrape; one right after reuses it;
    one after the reuse time scrapes again."""
    import threading
    walks: list[float] = []

    def slow_find(root: Path | None) -> list[Any]:
        walks.append(time.monotonic())
        time.sleep(0.2)
        return []
    monkeypatch.setattr(collector_mod, "find_pods", slow_find)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(tmp_path, reuse_seconds=0.5))
    texts: list[bytes] = []
    threads = [threading.Thread(target=lambda: texts.append(generate_latest(registry)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(texts) == 8 and len(set(texts)) == 1
    assert b"pykata_running_pods 0.0" in texts[0]
    generate_latest(registry)
    assert len(walks) == 1
    time.sleep(0.6)
    generate_latest(registry)
    assert len(walks) == 2


def test_the_current_assets_are_looked_up_once_a_second(tmp_path: Path) -> None:
    """A burst of /sandboxes requests hashes the guest assets once."""
    lookups: list[int] = []

    def assets() -> None:
        lookups.append(1)
    app = make_app(tmp_path, assets=assets)
    for _ in range(20):
        b"".join(app({"PATH_INFO": "/sandboxes", "REQUEST_METHOD": "GET"},
                     lambda status, headers: None))
    assert len(lookups) == 1


def test_idle_connections_are_dropped_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-sent requests hold no thread past the request timeout, and
    beyond the cap a connection is answered 503 at once (no thread);
    once the idle ones are dropped, a real request is answered."""
    import threading
    import urllib.request
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(server_mod._QuietHandler, "timeout", 2.0)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    with socket.socket() as probe:  # a free port (--listen takes no 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = listener(f"127.0.0.1:{port}", app)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    before = threading.active_count()
    socks = []

    def half_sent() -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.1\r\n")
        socks.append(conn)
        return conn
    try:
        idle = [half_sent() for _ in range(4)]
        deadline = time.monotonic() + 5
        while threading.active_count() < before + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threading.active_count() == before + 4
        for _ in range(6):
            assert half_sent().recv(200).startswith(b"HTTP/1.0 503")
        assert threading.active_count() == before + 4
        started = time.monotonic()
        assert [conn.recv(200) for conn in idle] == [b""] * 4  # dropped at the timeout
        assert time.monotonic() - started < 4
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            assert answer.read() == b"ok"
    finally:
        for conn in socks:
            conn.close()
        server.shutdown()
        server.server_close()
        serving.join(5)


def test_a_wildcard_listen_address_is_told_apart() -> None:
    """`pykata monitor` warns for these (every address of the node)."""
    assert is_wildcard("0.0.0.0:8090") and is_wildcard("[::]:8090")
    assert not is_wildcard("127.0.0.1:8090") and not is_wildcard("[::1]:8090")
