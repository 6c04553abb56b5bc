"""A hostile agent in a real VM: the host's trust checks at the agent boundary.

The VM is real (pykata's kernel under QEMU, through the real shim and a real
containerd); only the agent is replaced, by hostile_agent/, as a guest whose
root took the agent over could. Whatever it sends, the pod's exit and delete
reach containerd, the host stays responsive, and nothing is left behind.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pykata.assets import AssetCache, AssetPaths, InitrdSpec, build_initrd, default_cache_dir
from pykata.assets.initrd_plan import DEFAULT_INIT, SRC_ROOT
from tests.functional.containerd_peer import PrivateContainerd

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def hostile_initrd(guest_assets: AssetPaths) -> Path:
    """pykata's initrd with /init starting the hostile agent instead of pykata's
    (a cache of its own, so its builds never prune the real initrd)."""
    cache = AssetCache(default_cache_dir() / "hostile-agent")
    cache.root.mkdir(parents=True, exist_ok=True)
    init = cache.root / "init"
    init.write_text(DEFAULT_INIT.read_text().replace("-m pykata.agent", "-m hostile_agent"))
    spec = InitrdSpec(init_script=init, entry_module="hostile_agent.__main__",
                      source_roots=(SRC_ROOT, HERE))
    return build_initrd(spec, cache,
                        progress=lambda line: print(f"hostile initrd: {line}")).image


@pytest.fixture
def hostile(guest_assets: AssetPaths, hostile_initrd: Path,
            shim_config: Callable[[str], None]) -> Callable[[str], str]:
    """Make the shims boot the hostile agent in `mode`; returns the config text."""
    def use(mode: str) -> str:
        text = (f'[hypervisor.qemu]\nkernel = "{guest_assets.kernel}"\n'
                f'initrd = "{hostile_initrd}"\nkernel_params = "hostile={mode}"\n')
        shim_config(text)
        return text
    return use


def test_exit_status_out_of_range_reaches_containerd_as_255(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """The guest reports exit status -1: the task exits 255, and TaskExit and
    TaskDelete reach containerd (the shim used to fail every later call)."""
    hostile("exit")
    with containerd.events() as events:
        result = containerd.run("h-exit", "true")
        assert result.returncode == 255, result.err
        assert '"exit_status":255' in events.wait_for("/tasks/exit", "h-exit")
        events.wait_for("/tasks/delete", "h-exit")


def test_an_oom_flood_is_coalesced_and_exit_still_arrives(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """GetOOMEvent answered at once, without end, for 3 s: containerd gets at
    most one TaskOOM a second, and the task's exit and delete."""
    hostile("oom")
    with containerd.events() as events:
        result = containerd.run("h-oom", "true")
        assert result.returncode == 0, result.err
        events.wait_for("/tasks/exit", "h-oom")
        events.wait_for("/tasks/delete", "h-oom")
        ooms = [line for line in events.lines if "/tasks/oom" in line and "h-oom" in line]
    assert 1 <= len(ooms) <= 6, len(ooms)


def test_a_flood_of_unasked_frames_is_dropped_quietly(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """Thousands of frames nobody asked for (unknown streams, data frames,
    unknown types, one over the size limit) around every answer: the task runs
    and exits as usual, and the shim logs the drops a few times, not per frame."""
    hostile("frames")
    logged_before = containerd.log.read_text().count("dropping frames nobody waits for")
    result = containerd.run("h-frames", "true")
    assert result.returncode == 0, result.err
    logged = containerd.log.read_text().count("dropping frames nobody waits for")
    assert 1 <= logged - logged_before <= 5, logged - logged_before


def test_guest_error_text_reaches_the_user_escaped(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """An error message with ANSI escapes, a carriage return and a C1 control:
    ctr prints it escaped, and containerd's log holds no raw escape either."""
    hostile("escape")
    try:
        result = containerd.run("h-escape", "true")
    finally:
        # A failed Start leaves a created task (ctr deletes only stopped ones).
        containerd.remove("h-escape")
    assert result.returncode != 0
    assert "\x1b" not in result.err and "\r" not in result.err and "\x9b" not in result.err
    assert "\\x1b[2J" in result.err and "owned by the guest" in result.err, result.err
    assert "\x1b" not in containerd.log.read_text()


def test_a_reply_that_is_no_response_fails_cleanly(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """CreateContainer answered with bytes that decode to nothing: the create
    fails with a clear error and nothing of the pod remains (no_leftovers)."""
    hostile("invalid")
    result = containerd.run("h-invalid", "true")
    assert result.returncode != 0
    assert "the agent sent an invalid reply" in result.err, result.err


def test_out_of_range_pids_are_refused_and_the_task_still_ends(
    containerd: PrivateContainerd, hostile: Callable[[str], str],
) -> None:
    """ListProcesses with pids -1 and 99999999999: `ctr task ps` fails saying
    so; the task is still killed and deleted as usual."""
    hostile("ps")
    started = containerd.ctr("run", "-d", "--runtime", "io.containerd.pykata.v2",
                             "docker.io/pykata/busybox:test", "h-ps", "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        ps = containerd.ctr("task", "ps", "h-ps")
        assert ps.returncode != 0
        assert "unreadable process list" in ps.err, ps.err
    finally:
        containerd.remove("h-ps")
    assert containerd.task_status("h-ps") == ""


def test_console_escapes_are_shown_escaped_when_the_vm_dies(
    guest_assets: AssetPaths, hostile_initrd: Path, tmp_path: Path,
) -> None:
    """The guest writes escapes to its console and dies: `pykata run` reports
    the VM's end with the console's tail, escaped."""
    config = tmp_path / "configuration.toml"
    config.write_text(f'[hypervisor.qemu]\nkernel = "{guest_assets.kernel}"\n'
                      f'initrd = "{hostile_initrd}"\nkernel_params = "hostile=console"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pykata.cli.main", "--config", str(config), "run", "--", "true"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr, proc.stderr
    assert "owned by the guest" in proc.stderr and "\\x1b]0;" in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["metrics", "metrics-stall"])
def test_guest_metrics_cannot_forge_series_or_hold_the_scrape(
    containerd: PrivateContainerd, hostile: Callable[[str], str], mode: str,
) -> None:
    """`pykata monitor` scraping a pod whose agent answers GetMetrics with
    forged series in its names, 10000 interfaces and out-of-range numbers
    (metrics), or never answers it (metrics-stall): no forged series, at most
    32 interfaces, numbers clamped; a silent guest only loses its own figures
    (pykata_guest_up 0) and the scrape answers within the pod deadline."""
    from tests.functional.monitor_tools import Monitor, wait_for

    hostile(mode)
    started = containerd.ctr("run", "-d", "--runtime", "io.containerd.pykata.v2",
                             "docker.io/pykata/busybox:test", "h-metrics", "sleep", "600")
    assert started.returncode == 0, started.err
    monitor = Monitor(pod_timeout=1.0)
    try:
        sid = wait_for("the pod in /sandboxes", lambda: [
            e["id"] for e in monitor.sandboxes() if e["front_end"] == "shim"], 60)[0]
        began = time.monotonic()
        text = monitor.metrics()
        assert time.monotonic() - began < 3.0
        assert f'pykata_pod_info{{front_end="shim",sandbox_id="{sid}"' in text
        assert "forged" not in text and "\x1b" not in text and "passwd" not in text
        if mode == "metrics-stall":
            assert f'pykata_guest_up{{sandbox_id="{sid}"}} 0.0' in text
            assert "pykata_guest_memory_bytes{" not in text
            return
        # Its big reply may miss a scrape's deadline under emulation: a later one.
        text = wait_for("the hostile figures", lambda: (
            t if f'pykata_guest_up{{sandbox_id="{sid}"}} 1.0' in (t := monitor.metrics())
            else None), 30)
        assert "forged" not in text and "\x1b" not in text and "passwd" not in text
        # The first 32 interfaces are looked at, less the two with bad names.
        assert text.count("pykata_guest_network_receive_bytes_total{") == 30
        assert (f'pykata_guest_memory_bytes{{item="MemTotal",sandbox_id="{sid}"}} '
                "9.007199254740992e+15") in text  # clamped to 2^53
        assert f'pykata_guest_load1{{sandbox_id="{sid}"}} 0.0' in text
        assert f'pykata_guest_load15{{sandbox_id="{sid}"}} 1e+06' in text
    finally:
        monitor.stop()
        containerd.remove("h-metrics")
    assert containerd.task_status("h-metrics") == ""


def test_flooded_guest_spans_stay_bounded_in_their_own_trace(
    guest_assets: AssetPaths, hostile_initrd: Path, tmp_path: Path,
) -> None:
    """With tracing on, the guest answers every GetTraceSpans with about 1800
    spans under the host's RPC spans (absurd times, escapes in attributes),
    spans in other traces, under made-up parents and reusing the host's span
    id: the run succeeds, one trace arrives, with at most MAX_PER_WINDOW guest
    spans per RPC, each under and inside its RPC span, escapes escaped."""
    from pykata.tracing.guest import MAX_PER_WINDOW
    from tests.otlp_receiver import OtlpReceiver, check_trace

    with OtlpReceiver() as receiver:
        config = tmp_path / "configuration.toml"
        config.write_text(f'[hypervisor.qemu]\nkernel = "{guest_assets.kernel}"\n'
                          f'initrd = "{hostile_initrd}"\nkernel_params = "hostile=spans"\n'
                          f'[runtime]\nenable_tracing = true\n'
                          f'tracing_endpoint = "{receiver.endpoint}"\n')
        proc = subprocess.run(
            [sys.executable, "-m", "pykata.cli.main", "--config", str(config), "run", "--",
             "true"], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        receiver.wait_for("pod")
        traces = receiver.traces()
        assert len(traces) == 1, "a guest span escaped into another trace"
        (spans,) = traces.values()
        guest = check_trace(spans)
        rpcs = {s.span_id for s in spans if s.name.startswith("agent ")}
        assert guest and all(s.parent_span_id in rpcs for s in guest)
        per_rpc: dict[str, int] = {}
        for span in guest:
            per_rpc[span.parent_span_id] = per_rpc.get(span.parent_span_id, 0) + 1
            assert span.name.startswith("flood"), span.name
            assert all("\x1b" not in str(v) for v in span.attributes.values())
        assert max(per_rpc.values()) <= MAX_PER_WINDOW
