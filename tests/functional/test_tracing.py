"""Tracing from every front end into the guest, received over OTLP/HTTP.

Real VMs, the real agent: `ctr run` through containerd and the shim,
`pykata-oci run` and `pykata run` export to a receiver in this process that
decodes OTLP/HTTP protobuf requests (opentelemetry-proto); each run is one
trace, and the guest's spans hang under the host's agent RPC spans, inside
them in time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.functional.conftest import Cli, session_config_text
from tests.functional.containerd_peer import PrivateContainerd
from tests.functional.oci_tools import Oci, make_bundle
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, check_trace

pytestmark = pytest.mark.vm

# What a user waits on in every pod start and container run.
HOST_STEPS = {"pod", "pod.start", "vm.boot", "vm.launch", "agent.ready", "share.prepare",
              "sandbox.create", "container.create", "container.start", "pod.teardown",
              "agent Check", "agent CreateSandbox", "agent CreateContainer",
              "agent StartContainer", "agent DestroySandbox"}
GUEST_STEPS = {"guest CreateSandbox", "mount", "guest CreateContainer", "crun create",
               "guest StartContainer", "crun start"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as found:
        yield found


def traced_config(receiver: OtlpReceiver) -> str:
    text, count = re.subn(r"^enable_tracing = false$", "enable_tracing = true",
                          session_config_text(), flags=re.MULTILINE)
    assert count == 1
    return text.replace('tracing_endpoint = "http://127.0.0.1:4318/v1/traces"',
                        f'tracing_endpoint = "{receiver.endpoint}"')


def one_pod_trace(receiver: OtlpReceiver, runs: int = 1) -> list[list[ReceivedSpan]]:
    """The traces of `runs` pods, each checked: every step there, guest spans
    under and inside the host's RPC spans."""
    receiver.wait_for("pod", runs, timeout=60)
    traces = list(receiver.traces().values())
    assert len(traces) == runs, [sorted({s.name for s in t}) for t in traces]
    for spans in traces:
        names = {s.name for s in spans}
        assert names >= HOST_STEPS, HOST_STEPS - names
        assert names >= GUEST_STEPS, GUEST_STEPS - names
        guest = check_trace(spans)
        assert {s.name for s in guest} >= GUEST_STEPS
    return traces


def test_pykata_run_is_one_trace_into_the_guest(cli: Cli, receiver: OtlpReceiver,
                                                tmp_path: Path) -> None:
    """`pykata run` with tracing on: one trace, from the pod's start through
    its agent RPCs into the agent's work (its mounts, crun)."""
    config = tmp_path / "configuration.toml"
    config.write_text(traced_config(receiver))
    result = cli("run", "--", "true", env={"PYKATA_CONFIG": str(config)})
    assert result.returncode == 0, result.err
    one_pod_trace(receiver)


def test_pykata_oci_run_is_one_trace(guest_assets: object, receiver: OtlpReceiver,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pykata-oci run` (docker's and podman's way in): one trace per container."""
    config = tmp_path / "configuration.toml"
    config.write_text(traced_config(receiver))
    monkeypatch.setenv("PYKATA_CONFIG", str(config))
    oci = Oci(tmp_path / "root")
    bundle = make_bundle(tmp_path / "b", ["true"])
    result = oci("run", "--bundle", str(bundle), "traced")
    assert result.returncode == 0, result.err
    one_pod_trace(receiver)


def test_each_ctr_run_is_one_trace(containerd: PrivateContainerd, receiver: OtlpReceiver,
                                   shim_config: Callable[[str], None]) -> None:
    """Through containerd and the shim: two `ctr run`s are two traces, each
    with its own pod's steps and guest spans."""
    shim_config(traced_config(receiver))
    for name in ("trace-1", "trace-2"):
        result = containerd.run(name, "true")
        assert result.returncode == 0, result.err
    traces = one_pod_trace(receiver, runs=2)
    pods = sorted(str(next(s.attributes["pykata.pod"] for s in t if s.name == "pod"))
                  for t in traces)
    assert pods == ["trace-1", "trace-2"]
