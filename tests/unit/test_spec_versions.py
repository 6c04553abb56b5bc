"""runtime-spec versions 1.1.0 to 1.3.0: what the host accepts, refuses and
drops (pykata.runtime.spec_versions), and what the agent hands crun and
applies itself (pykata.agent.guest_spec, pykata.agent.process_attrs)."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import guest_spec, process_attrs
from pykata.errors import SpecError
from pykata.oci.verbs import FEATURES
from pykata.protocols.oci_spec import (
    message_to_json,
    process_from_json,
    spec_from_json,
    spec_to_json,
)
from pykata.runtime.hooks import run_hooks
from pykata.runtime.spec import check_spec, load_bundle
from pykata.runtime.spec_versions import check_process, check_resources, poststart_failure_stops
from pykata.spec_fields import GUEST_VERSION, MAX_VERSION, parse_version
from pykata.ttrpc import Code, StatusError

DATA = Path(__file__).resolve().parents[1] / "data"
ALL = frozenset({"cpuset", "cpu", "io", "memory", "pids"})  # the guest's controllers


def data_spec(version: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((DATA / f"runtime-spec-{version}-config.json").read_text())
    return spec


def through_the_protocol(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the agent receives it."""
    return spec_to_json(spec_from_json(spec))


def for_guest(spec: dict[str, Any]) -> dict[str, Any]:
    return guest_spec.for_guest(spec, "c1", sandbox_pid=None, share_pid_ns=False,
                                controllers=ALL)


def escaped(text: str) -> str:
    return text.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")


# --- versions -------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0.0", "1.0.2-dev", "1.1.0-rc.1", "1.1.0", "1.2.0",
                                     "1.2.1", "1.3.0", "1.9.0", "1.3.0+build.5"])
def test_every_1_x_version_is_accepted(version: str) -> None:
    """Any SemVer 1.x passes; a version newer than 1.3.0 too (unknown keys
    are ignored, as runtime-spec's extensibility rule says)."""
    spec = data_spec("1.2.0")
    spec["ociVersion"] = version
    check_spec(spec, "config.json")


@pytest.mark.parametrize(("version", "problem"), [
    ("2.0.0", "major version 2"), ("0.5.0", "major version 0"),
    ("1.0", "not a SemVer version"), ("one", "not a SemVer version"),
    (3, "must be a string"),
])
def test_other_majors_and_malformed_versions_are_refused(version: Any, problem: str) -> None:
    """A major version other than 1, or no SemVer at all: refused by name."""
    spec = data_spec("1.2.0")
    spec["ociVersion"] = version
    with pytest.raises(SpecError, match=f"ociVersion.*{problem}"):
        check_spec(spec, "config.json")


def test_features_report_the_newest_version_pykata_knows() -> None:
    """`pykata-oci features` and the checks agree on the newest version."""
    assert FEATURES["ociVersionMax"] == MAX_VERSION == "1.3.0"
    assert parse_version(MAX_VERSION) >= parse_version(FEATURES["ociVersionMin"])


# --- the host: applied fields pass, the rest is refused or dropped ----------


def test_the_newer_engines_specs_pass_and_their_fields_are_carried() -> None:
    """Both hand-written specs pass the host's checks, and every field the
    guest applies reaches the agent."""
    check_spec(data_spec("1.2.0"), "1.2.0")
    spec = data_spec("1.3.0")
    check_spec(spec, "1.3.0")
    sent = through_the_protocol(spec)
    assert sent["ociVersion"] == "1.3.0" and sent["domainname"] == "pykata.test"
    assert sent["process"]["user"]["umask"] == 23
    assert sent["process"]["ioPriority"] == {"class": "IOPRIO_CLASS_IDLE", "priority": 7}
    assert sent["process"]["scheduler"] == {"policy": "SCHED_BATCH", "nice": 5}
    assert sent["linux"]["personality"] == {"domain": "LINUX32"}
    resources = sent["linux"]["resources"]
    assert resources["cpu"]["burst"] == 20000 and resources["cpu"]["idle"] == 1
    assert resources["memory"]["checkBeforeUpdate"] is True
    assert resources["unified"] == {"memory.high": "201326592"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        keys = path.split(".")
        node = spec
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return change


def _add_mount(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/data", "type": "bind", "source": "/srv",
                               "options": ["rbind"], **fields})
    return change


IDMAP = [{"containerID": 0, "hostID": 100000, "size": 65536}]
NOTIFY = {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/seccomp-agent.sock",
          "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]}


@pytest.mark.parametrize(("change", "field", "why"), [
    (_set("process.execCPUAffinity", {"initial": "0", "final": "0-1"}),
     "process.execCPUAffinity", "cannot pin"),
    (_set("linux.timeOffsets", {"boottime": {"secs": 3600}}), "linux.timeOffsets",
     "time namespace"),
    (lambda s: s["linux"]["namespaces"].append({"type": "time"}), "linux.namespaces: time",
     "time namespace"),
    (_set("linux.memoryPolicy", {"mode": "MPOL_BIND", "nodes": "0-1"}), "linux.memoryPolicy",
     "single memory node"),
    (_set("linux.memoryPolicy", {"mode": "MPOL_PREFERRED", "nodes": "1"}),
     "linux.memoryPolicy", "NUMA"),
    (_set("linux.netDevices", {"eth1": {"name": "ctr1"}}), "linux.netDevices",
     "host network device"),
    (_add_mount(uidMappings=IDMAP, gidMappings=IDMAP), "mounts[8].uidMappings", "9p"),
    (_add_mount(options=["rbind", "idmap"]), "mounts[8].options: idmap", "idmap"),
    (_add_mount(options=["rbind", "ridmap"]), "mounts[8].options: ridmap", "idmap"),
    (_set("linux.seccomp", NOTIFY), "linux.seccomp.listenerPath", "on the host"),
    (_set("vm", {"hypervisor": {"path": "/usr/bin/qemu"}}), "vm", "hypervisor"),
])
def test_what_the_guest_cannot_honour_is_refused_by_name(
        change: Callable[[dict[str, Any]], None], field: str, why: str) -> None:
    """Each refusal names the field, says why and what to do."""
    spec = data_spec("1.3.0")
    change(spec)
    with pytest.raises(SpecError, match=escaped(field)) as info:
        check_spec(spec, "config.json")
    assert why in str(info.value) and "not supported" in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize(("change", "field"), [
    (_set("process.ioPriority", {"class": "IOPRIO_CLASS_NONE", "priority": 0}),
     "process.ioPriority.class"),
    (_set("process.ioPriority", {"class": "IOPRIO_CLASS_BE", "priority": 8}),
     "process.ioPriority.priority"),
    (_set("process.scheduler", {"policy": "SCHED_ISO"}), "no SCHED_ISO"),
    (_set("process.scheduler", {"policy": "SCHED_FIFO"}), "process.scheduler.priority"),
    (_set("process.scheduler", {"policy": "SCHED_BATCH", "priority": 3}),
     "process.scheduler.priority"),
    (_set("process.scheduler", {"policy": "SCHED_OTHER", "nice": 20}),
     "process.scheduler.nice"),
    (_set("process.scheduler", {"policy": "SCHED_OTHER", "flags": ["SCHED_FLAG_UTIL_CLAMP_MIN"]}),
     "no clamp values"),
    (_set("process.scheduler", {"policy": "SCHED_DEADLINE", "runtime": 0}), "SCHED_DEADLINE"),
    (_set("linux.personality", {"domain": "LINUX64"}), "linux.personality.domain"),
    (_set("linux.personality", {"domain": "LINUX", "flags": ["ADDR_NO_RANDOMIZE"]}),
     "linux.personality.flags"),
    (_set("linux.resources.cpu", {"quota": 1000, "burst": 2000}), "cpu.burst"),
    (_set("linux.resources.cpu", {"idle": 2}), "cpu.idle"),
    (_set("linux.resources.unified", {"../cgroup.procs": "1"}), "unified"),
    (_set("linux.resources.unified", {"cgroup.procs": "1"}), "core files"),
    (_set("linux.resources.memory", {"useHierarchy": False}), "useHierarchy"),
    (_set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW",
                            "architectures": ["SCMP_ARCH_AARCH64"]}), "x86_64"),
])
def test_values_the_kernel_has_no_meaning_for_are_refused(
        change: Callable[[dict[str, Any]], None], field: str) -> None:
    """Applied fields are checked before a VM boots, not left to crun."""
    spec = data_spec("1.3.0")
    change(spec)
    with pytest.raises(SpecError, match=escaped(field)):
        check_spec(spec, "config.json")


@pytest.mark.parametrize(("change", "note"), [
    (lambda s: None, "linux.intelRdt"),  # the 1.3.0 data spec has one
    (_set("linux.resources.rdma", {"mlx5_1": {"hcaHandles": 3}}), "linux.resources.rdma"),
    (_set("linux.resources.memory", {"useHierarchy": True}), "useHierarchy"),
    (_set("linux.memoryPolicy", {"mode": "MPOL_DEFAULT"}), "MPOL_DEFAULT"),
    (_set("linux.seccomp", {**NOTIFY, "syscalls": []}), "no SCMP_ACT_NOTIFY rule"),
    (_set("windows", {"layerFolders": []}), "windows: settings for another platform"),
    (_set("freebsd", {"jail": {}}), "freebsd"),
    (lambda s: None, "SCMP_ARCH_LOONGARCH64"),
])
def test_what_names_the_host_or_changes_nothing_is_dropped_with_a_note(
        change: Callable[[dict[str, Any]], None], note: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Accepted, and the note says what was dropped and why."""
    spec = data_spec("1.3.0")
    change(spec)
    with caplog.at_level(logging.WARNING, logger="pykata.runtime.spec_versions"):
        check_spec(spec, "config.json")
    assert any(note in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_exec_processes_take_no_deadline_policy_nor_flags() -> None:
    """An exec'd process inherits crun exec's scheduling: what a fork does
    not carry is refused for it, and accepted for the container's process."""
    for scheduler in ({"policy": "SCHED_DEADLINE", "runtime": 10**6, "deadline": 10**7},
                      {"policy": "SCHED_OTHER", "flags": ["SCHED_FLAG_RESET_ON_FORK"]}):
        process = {"args": ["true"], "cwd": "/", "scheduler": scheduler}
        check_process(process, "process", exec_process=False)
        with pytest.raises(SpecError, match="exec'd process"):
            check_process(process, "process", exec_process=True)
    check_process({"scheduler": {"policy": "SCHED_IDLE"},
                   "ioPriority": {"class": "IOPRIO_CLASS_RT", "priority": 0}},
                  "process", exec_process=True)


def test_an_update_is_checked_like_the_spec() -> None:
    """Resources of an update: the same refusals, the same notes."""
    assert check_resources({"cpu": {"quota": 50000, "burst": 10000, "idle": 0}},
                           "resources") == []
    assert check_resources({"rdma": {"x": {}}}, "resources")
    with pytest.raises(SpecError, match=r"resources\.cpu\.burst"):
        check_resources({"cpu": {"quota": 50000, "burst": 60000}}, "resources")
    with pytest.raises(SpecError, match=r"resources\.unified"):
        check_resources({"unified": {"memory/../x": "1"}}, "resources")


def test_relative_mount_destinations_become_absolute(tmp_path: Path) -> None:
    """runtime-spec 1.2.0 allows a destination relative to "/"; the bundle's
    spec carries it absolute from then on (volumes, mount points, crun)."""
    spec = data_spec("1.2.0")
    spec["mounts"].append({"destination": "data/cache", "type": "tmpfs", "source": "tmpfs"})
    (tmp_path / "config.json").write_text(json.dumps(spec))
    loaded, _root = load_bundle(tmp_path)
    assert loaded["mounts"][-1]["destination"] == "/data/cache"
    assert loaded["mounts"][0]["destination"] == "/proc"


def test_poststart_failures_stop_the_container_from_1_3_0_on() -> None:
    assert not poststart_failure_stops(data_spec("1.2.0"))
    assert poststart_failure_stops(data_spec("1.3.0"))
    assert not poststart_failure_stops({"ociVersion": "garbage"})


async def test_a_failing_poststart_hook_raises_only_when_asked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before 1.3.0 a failing poststart hook is a warning and the next runs;
    with `fail_poststart` it raises and the next does not run."""
    mark = tmp_path / "second-ran"
    hooks = [{"path": "/bin/false"}, {"path": "/bin/sh", "args": ["sh", "-c", f"touch {mark}"]}]
    state = {"ociVersion": "1.3.0", "id": "c1", "status": "running", "bundle": str(tmp_path)}
    with caplog.at_level(logging.WARNING):
        await run_hooks(hooks, state, phase="poststart")
    assert mark.exists() and "lifecycle goes on" in caplog.text
    mark.unlink()
    with pytest.raises(Exception, match="poststart"):
        await run_hooks(hooks, state, phase="poststart", fail_poststart=True)
    assert not mark.exists()


# --- the guest: what crun gets, what the agent applies ---------------------


def test_crun_gets_version_1_0_2_without_what_it_would_ignore() -> None:
    """The agent's rewrite of the 1.3.0 spec: a version crun 1.8.1 takes,
    cpu.burst as the unified file crun writes, checkBeforeUpdate, ioPriority
    and scheduler taken out for the agent, foreign seccomp architectures and
    intelRdt dropped; crun's own fields stay."""
    guest = for_guest(through_the_protocol(data_spec("1.3.0")))
    assert guest["ociVersion"] == GUEST_VERSION == "1.0.2"
    resources = guest["linux"]["resources"]
    assert "burst" not in resources["cpu"] and resources["cpu"]["idle"] == 1
    assert resources["unified"] == {"cpu.max.burst": "20000", "memory.high": "201326592"}
    assert resources["memory"] == {"limit": 268435456}
    assert guest["linux"]["seccomp"]["architectures"] == [
        "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert "intelRdt" not in guest["linux"]
    assert guest["domainname"] == "pykata.test"
    assert guest["linux"]["personality"] == {"domain": "LINUX32"}
    assert guest["process"]["user"]["umask"] == 23
    attrs = process_attrs.take(guest["process"], exec_process=False)
    assert "ioPriority" not in guest["process"] and "scheduler" not in guest["process"]
    assert attrs.ioprio == 3 << 13 | 7
    assert attrs.sched == (3, 0, 5, 0, 0, 0, 0)  # SCHED_BATCH, nice 5


def test_the_1_2_0_spec_reaches_crun_as_it_was_but_for_its_version() -> None:
    spec = through_the_protocol(data_spec("1.2.0"))
    before = copy.deepcopy(spec)
    guest = for_guest(spec)
    assert guest["ociVersion"] == "1.0.2"
    assert guest["mounts"] == before["mounts"] and guest["process"] == before["process"]
    assert not process_attrs.take(guest["process"], exec_process=False)


@pytest.mark.parametrize(("change", "message"), [
    (_set("ociVersion", "2.0.0"), "ociVersion"),
    (_set("linux.resources.unified", {"../../x": "1"}), "unified"),
    (_set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW",
                            "architectures": ["SCMP_ARCH_ARM"]}), "x86"),
])
def test_the_agent_checks_again_what_it_applies(
        change: Callable[[dict[str, Any]], None], message: str) -> None:
    """A spec the host should have refused is refused in the guest too."""
    spec = through_the_protocol(data_spec("1.2.0"))
    change(spec)
    with pytest.raises(StatusError, match=message) as info:
        for_guest(spec)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_an_update_burst_becomes_the_unified_file() -> None:
    out = guest_spec.guest_resources(
        {"cpu": {"quota": 50000, "period": 100000, "burst": 5000},
         "memory": {"limit": 1 << 26, "checkBeforeUpdate": True}}, "c1", ALL)
    assert out == {"cpu": {"quota": 50000, "period": 100000},
                   "memory": {"limit": 1 << 26}, "unified": {"cpu.max.burst": "5000"}}


@pytest.mark.parametrize(("process", "exec_process", "problem"), [
    ({"ioPriority": {"class": "IOPRIO_CLASS_XX", "priority": 1}}, False, "ioPriority"),
    ({"ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 9}}, False, "priority"),
    ({"scheduler": {"policy": "SCHED_RR", "priority": 0}}, False, "priority"),
    ({"scheduler": {"policy": "SCHED_OTHER", "nice": -21}}, False, "nice"),
    ({"scheduler": {"policy": "SCHED_OTHER", "flags": ["SCHED_FLAG_X"]}}, False, "flags"),
    ({"scheduler": {"policy": "SCHED_DEADLINE", "runtime": 1, "deadline": 2}}, True,
     "exec'd"),
])
def test_the_agent_refuses_attributes_it_cannot_set(
        process: dict[str, Any], exec_process: bool, problem: str) -> None:
    with pytest.raises(StatusError, match=problem) as info:
        process_attrs.take(process, exec_process=exec_process)
    assert info.value.code == Code.INVALID_ARGUMENT


def _proc_stat(pid: int) -> tuple[int, int]:
    """nice and policy of `pid` (/proc/PID/stat fields 19 and 41)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[16]), int(fields[38])


def _ioprio(pid: int) -> int:
    return process_attrs._syscall(252, 1, pid)  # ioprio_get(IOPRIO_WHO_PROCESS, pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another process's scheduling needs root")
def test_attributes_reach_a_process_and_what_it_spawns_but_not_the_agent() -> None:
    """On this kernel: `apply` sets a waiting process's attributes; within
    `inherited_by_spawns` a spawned process starts with them, and the
    spawning thread has its own back afterwards."""
    attrs = process_attrs.take({"ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 6},
                                "scheduler": {"policy": "SCHED_BATCH", "nice": 4}},
                               exec_process=True)
    before = (_proc_stat(os.getpid()), _ioprio(0))
    waiting = os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
    with process_attrs.inherited_by_spawns(attrs):
        spawned = os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
    try:
        assert (_proc_stat(os.getpid()), _ioprio(0)) == before
        assert _proc_stat(spawned) == (4, 3) and _ioprio(spawned) == 2 << 13 | 6
        assert _proc_stat(waiting) == (0, 0)
        process_attrs.apply(waiting, process_attrs.take(
            {"ioPriority": {"class": "IOPRIO_CLASS_IDLE", "priority": 0},
             "scheduler": {"policy": "SCHED_IDLE"}}, exec_process=False))
        assert _proc_stat(waiting)[1] == 5 and _ioprio(waiting) >> 13 == 3
    finally:
        for pid in (waiting, spawned):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def test_exec_process_documents_carry_the_process_fields() -> None:
    """An exec's process JSON (pykata-oci exec --process, the shim's Exec)
    keeps ioPriority and scheduler through the protocol."""
    process = {"args": ["true"], "cwd": "/",
               "ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 0},
               "scheduler": {"policy": "SCHED_IDLE"}}
    assert message_to_json(process_from_json(process))["ioPriority"] == process["ioPriority"]
