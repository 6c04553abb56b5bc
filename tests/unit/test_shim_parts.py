"""The shim's pure parts: flags, pod grouping, annotations, logs, metrics, status codes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pykata import config
from pykata.errors import AgentError, ConfigError, NotFoundError, SpecError
from pykata.protocols import agent_pb2, cgroups_v2_pb2
from pykata.runtime import pod_options as annotations
from pykata.runtime.error_codes import to_status
from pykata.shim import cli, metrics, shimlog, start
from pykata.ttrpc import Code


def test_flags_parse_like_go() -> None:
    """-name value, -name=value, --name, booleans and the action are understood."""
    flags = cli.parse(["-namespace", "k8s.io", "-id=abc", "--address", "/run/c.sock",
                       "-publish-binary", "/usr/bin/containerd", "-debug", "start"])
    assert (flags.namespace, flags.id, flags.address) == ("k8s.io", "abc", "/run/c.sock")
    assert flags.debug and flags.action == "start"
    again = cli.parse([*flags.to_args(), "delete"])
    assert (again.namespace, again.id, again.address, again.debug) == (
        "k8s.io", "abc", "/run/c.sock", True)
    assert cli.parse(["-v"]).version


@pytest.mark.parametrize("argv", [["-nope", "x"], ["-id"]])
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    """An unknown flag or a flag without its value is refused."""
    with pytest.raises(cli.UsageError):
        cli.parse(argv)


def test_pod_grouping_by_cri_annotations(tmp_path: Path) -> None:
    """Containers of a pod group under the sandbox id; others under their own id."""
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod-1"}}))
    assert start.group_of(str(tmp_path), "c1") == "pod-1"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {}}))
    assert start.group_of(str(tmp_path), "c1") == "c1"
    (tmp_path / "config.json").write_text("{not json")
    assert start.group_of(str(tmp_path), "c1") == "c1"


def test_socket_path_is_per_containerd_and_short(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Two containerds with the same ids get different sockets, under the run root."""
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(tmp_path))
    one = cli.parse(["-namespace", "n", "-id", "x", "-address", "/a.sock"])
    two = cli.parse(["-namespace", "n", "-id", "x", "-address", "/b.sock"])
    assert start.socket_path(one, "x") != start.socket_path(two, "x")
    assert start.socket_path(one, "x").startswith(str(tmp_path / "shims"))
    assert len(start.socket_path(one, "x")) < 108


def _config(*allowed: str) -> config.Config:
    return config.parse({"hypervisor": {"qemu": {"enable_annotations": list(allowed)}}},
                        "/etc/pykata/test.toml")


def test_annotation_allowlist_matches_in_full() -> None:
    """An allowlist entry is a full-match regular expression."""
    key = annotations.HYPERVISOR_PREFIX + "default_memory"
    with pytest.raises(ConfigError) as refused:
        annotations.sandbox_options({key: "300"}, _config("default_mem"))
    assert "enable_annotations" in str(refused.value)
    assert "/etc/pykata/test.toml" in str(refused.value)
    options = annotations.sandbox_options({key: "300", "unrelated": "x"},
                                          _config("default_mem.*"))
    assert options.memory_mib == 300


def test_annotation_values_and_names_are_checked() -> None:
    """Out-of-range values, unsupported names and other prefixes are refused."""
    prefix = annotations.HYPERVISOR_PREFIX
    with pytest.raises(ConfigError, match="must be between 1 and 64"):
        annotations.sandbox_options({prefix + "default_vcpus": "0"}, _config(".*"))
    with pytest.raises(ConfigError, match="not supported"):
        annotations.sandbox_options({prefix + "path": "/bin/evil"}, _config(".*"))
    with pytest.raises(ConfigError, match="not supported"):
        annotations.sandbox_options({annotations.PREFIX + "runtime.debug": "1"}, _config(".*"))
    # Agent annotations have their own allowlist ([agent] enable_annotations).
    with pytest.raises(ConfigError, match=r"not allowed.*\[agent\] enable_annotations"):
        annotations.sandbox_options({annotations.PREFIX + "agent.debug": "1"}, _config(".*"))
    params = annotations.sandbox_options({prefix + "kernel_params": "quiet"}, _config(".*"))
    assert params.kernel_params == "quiet"


def test_logfmt_lines_carry_ids_and_escape_text() -> None:
    """Log lines are logfmt with quoting, and name the container they concern."""
    formatter = shimlog.LogfmtFormatter(runtime="io.containerd.pykata.v2")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, 'bad "thing"\nhappened',
                               None, None)
    record.container = "c1"
    line = formatter.format(record)
    assert line.startswith("time=")
    assert "level=error" in line
    assert 'msg="bad \\"thing\\"\\nhappened"' in line
    assert "container=c1" in line and "runtime=io.containerd.pykata.v2" in line
    assert "\n" not in line


def test_fifo_handler_drops_instead_of_blocking() -> None:
    """When the reader is behind, a log line is dropped and counted, never waited on."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    handler = shimlog.FifoHandler(write_end)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "y" * 65536, None, None)
    for _ in range(4):
        handler.emit(record)
    assert handler.dropped >= 1
    handler.close()
    os.close(read_end)


def test_metrics_convert_units_and_memory_keys() -> None:
    """Agent cgroup figures become cgroups v2 Metrics (microseconds, memory.stat keys)."""
    stats = agent_pb2.StatsContainerResponse()
    cg = stats.cgroup_stats
    cg.cpu_stats.cpu_usage.total_usage = 5_000_000
    cg.cpu_stats.cpu_usage.usage_in_usermode = 3_000_000
    cg.memory_stats.usage.usage = 4096
    cg.memory_stats.usage.limit = 8192
    cg.memory_stats.stats["anon"] = 1234
    cg.memory_stats.stats["not_a_field"] = 1
    cg.pids_stats.current = 3
    packed = metrics.pack_metrics(metrics.to_v2_metrics(stats))
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    decoded = cgroups_v2_pb2.Metrics.FromString(packed.value)
    assert decoded.cpu.usage_usec == 5000 and decoded.cpu.user_usec == 3000
    assert (decoded.memory.usage, decoded.memory.usage_limit) == (4096, 8192)
    assert decoded.memory.anon == 1234 and decoded.pids.current == 3


def test_errors_map_to_containerd_status_codes() -> None:
    """pykata's errors become the codes containerd turns into its error kinds."""
    assert to_status(NotFoundError("x")).code == Code.NOT_FOUND
    assert to_status(SpecError("x")).code == Code.INVALID_ARGUMENT
    assert to_status(ConfigError("x")).code == Code.INVALID_ARGUMENT
    assert to_status(AgentError("x", code=int(Code.ALREADY_EXISTS))).code == Code.ALREADY_EXISTS
    assert to_status(AgentError("x")).code == Code.UNKNOWN


@pytest.mark.parametrize("value, refused", [
    ("init=/bin/sh", "init="), ("quiet rdinit=/x", "rdinit="), ("panic=0", "panic="),
    ("console=ttyS1", "console="), ("pykata.transport=serial", "pykata.transport"),
    ("reboot=w", "reboot="), ("-- evil", "--"), ("a=`id`", "characters"),
    ("root=/dev/vda", "root="),
    # The bypasses of the old list: a sysctl, and words the kernel hands to
    # /init's environment (init's stage switch, the agent's interpreter).
    ("sysctl.kernel.panic=0", "parameter sysctl.kernel.panic= is not allowed: it writes a "
                              "guest sysctl"),
    ("sysctl/kernel/panic=0", "parameter sysctl/kernel/panic= is not allowed"),
    ("PYKATA_STAGE=2", "parameter PYKATA_STAGE= is not allowed: the kernel hands it to the "
                       "guest's init as an environment variable"),
    ("quiet PYTHONINSPECT=1", "parameter PYTHONINSPECT= is not allowed"),
    ("PYTHONWARNINGS=error", "parameter PYTHONWARNINGS= is not allowed"),
    ("S", "parameter S is not allowed: the kernel hands it to the guest's init as an "
          "argument"),
])
def test_kernel_params_refuse_dangerous_parameters_by_name(value: str, refused: str) -> None:
    """Even with kernel_params allowed, what controls init, panics, the console
    and pykata's own parameters is refused, naming the parameter."""
    key = annotations.HYPERVISOR_PREFIX + "kernel_params"
    with pytest.raises(ConfigError) as error:
        annotations.sandbox_options({key: value}, _config("kernel_params"))
    assert refused in str(error.value) and key in str(error.value)


def test_kernel_params_pass_ordinary_parameters() -> None:
    """Parameters on pykata's list go through, normalised to single spaces;
    a name may be written with - for _ as the kernel allows."""
    key = annotations.HYPERVISOR_PREFIX + "kernel_params"
    options = annotations.sandbox_options(
        {key: " loglevel=3  mitigations=off quiet cgroup-disable=memory printk.time=1 "},
        _config("kernel_params"))
    assert options.kernel_params == ("loglevel=3 mitigations=off quiet cgroup-disable=memory "
                                     "printk.time=1")


@pytest.mark.parametrize("value", ["single", "nosmt=force", "rd_init=/x", "=x",
                                   "transparent_hugepage=never"])
def test_kernel_params_off_the_allowlist_are_refused(value: str) -> None:
    """Any other word, bare or NAME=VALUE (the kernel hands what it does not
    know to /init), is refused naming it; the hint names the configuration
    key that would allow it."""
    key = annotations.HYPERVISOR_PREFIX + "kernel_params"
    with pytest.raises(ConfigError) as error:
        annotations.sandbox_options({key: f"quiet {value}"}, _config("kernel_params"))
    name = value.partition("=")[0] or value
    assert f"parameter {name} is not one a pod may set" in str(error.value)
    assert error.value.hint is not None
    assert "valid_kernel_params in /etc/pykata/test.toml" in error.value.hint


def test_operators_extend_the_kernel_params_allowlist() -> None:
    """A name the configuration's valid_kernel_params lists is allowed (in
    either spelling); the names pykata never allows cannot be listed."""
    key = annotations.HYPERVISOR_PREFIX + "kernel_params"
    cfg = config.parse({"hypervisor": {"qemu": {
        "enable_annotations": ["kernel_params"],
        "valid_kernel_params": ["nosmt", "spectre-v2"]}}}, "/etc/pykata/test.toml")
    options = annotations.sandbox_options({key: "nosmt=force spectre_v2=off"}, cfg)
    assert options.kernel_params == "nosmt=force spectre_v2=off"
    with pytest.raises(ConfigError, match="parameter single is not one a pod may set"):
        annotations.sandbox_options({key: "nosmt single"}, cfg)


def test_a_shim_going_away_removes_only_its_own_socket(tmp_path: Path) -> None:
    """The old shim's socket was replaced by its successor's at the same path:
    the old one's release leaves the successor's socket in place."""
    path = str(tmp_path / "pod.sock")
    Path(path).write_text("old")
    os.utime(path, ns=(1, 1001))  # as `_listen` marks each socket
    mine = start.file_identity(path)
    os.unlink(path)
    Path(path).write_text("successor")  # may well get the same inode number
    os.utime(path, ns=(1, 2002))
    with start.pod_lock(path):
        start.release_pod_files(path, only=mine)
    assert Path(path).read_text() == "successor"
    with start.pod_lock(path):
        start.release_pod_files(path, only=start.file_identity(path))
    assert not Path(path).exists() and not Path(path + ".lock").exists()


def test_a_lock_file_removed_by_its_holder_is_not_held_by_a_waiter(tmp_path: Path) -> None:
    """A waiter that opened the lock file before its holder removed it takes
    the new lock file instead, so two processes never both hold the pod."""
    import threading
    import time

    path = str(tmp_path / "pod.sock")
    inside: list[str] = []
    ready = threading.Event()

    def waiter() -> None:
        ready.wait()
        with start.pod_lock(path):
            inside.append("waiter")
            assert os.path.exists(path + ".lock")

    thread = threading.Thread(target=waiter)
    thread.start()
    with start.pod_lock(path):
        ready.set()
        time.sleep(0.2)  # the waiter now blocks on the file we are about to remove
        inside.append("holder")
        start.release_pod_files(path)
    thread.join(10)
    assert inside == ["holder", "waiter"]
