"""The host cgroup layer: reading the hierarchies, laying out paths (cgroupfs
and systemd forms), refusing paths that leave a hierarchy, what each version
is written, and a pod's limits from its containers'."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from pykata.config import RuntimeConfig
from pykata.errors import SpecError
from pykata.host.cgroups import (
    CgroupError,
    CgroupPath,
    Hierarchy,
    HostCgroup,
    Layout,
    Limits,
    _check_unused,
    _within_parent_quota,
    directory_of,
    expand_systemd,
    is_systemd_path,
    parse_mountinfo,
    remove_dirs,
    shares_to_weight,
    v1_writes,
    v2_writes,
)
from pykata.runtime.pod_cgroup import (
    MIB,
    ContainerRequest,
    check_memory,
    container_request,
    merge_update,
    minimum_memory_mib,
    placement_from_spec,
    pod_limits,
    widest,
)

V1_MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct2 rw,relatime - cgroup cgroup rw,cpu,cpuacct
36 30 0:33 /kubepods /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
"""

HYBRID_MOUNTINFO = V1_MOUNTINFO + (
    "37 30 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n")

V2_MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n")

CONFIG = RuntimeConfig()


# --- the hierarchies ------------------------------------------------------------------


def test_v1_hierarchies_are_found_with_their_controllers() -> None:
    layout = parse_mountinfo(V1_MOUNTINFO)
    assert layout.mode == "v1"
    by_mount = {str(h.mount): h for h in layout.hierarchies}
    assert by_mount["/sys/fs/cgroup/cpu"].controllers == {"cpu"}
    assert by_mount["/sys/fs/cgroup/systemd"].controllers == {"name=systemd"}
    assert by_mount["/sys/fs/cgroup/systemd"].key() == "name=systemd"
    assert by_mount["/sys/fs/cgroup/cpu,cpuacct2"].key() == "cpu,cpuacct"
    # A mount that shows only part of its hierarchy says which part.
    assert by_mount["/sys/fs/cgroup/pids"].root == "/kubepods"
    assert "/sys/fs/cgroup" not in by_mount  # the tmpfs


def test_hybrid_and_v2_layouts_are_told_apart() -> None:
    assert parse_mountinfo(HYBRID_MOUNTINFO).mode == "hybrid"
    v2 = parse_mountinfo(V2_MOUNTINFO)
    assert v2.mode == "v2"
    assert v2.hierarchies[0].version == 2
    assert parse_mountinfo("").mode == "none"


def test_this_hosts_own_layout_is_read() -> None:
    from pykata.host.cgroups import host_layout, process_cgroups

    layout = host_layout()
    mine = process_cgroups()
    # Every hierarchy mounted here has a line in /proc/self/cgroup.
    for h in layout.hierarchies:
        assert h.key() in mine, (h, mine)


# --- paths ------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "path"), [
    ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
    ("kubepods-besteffort-pod12.slice:cri-containerd:abc",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/"
     "cri-containerd-abc.scope"),
    ("-.slice:pykata:x", "/pykata-x.scope"),
    (":pykata:x", "/system.slice/pykata-x.scope"),
    ("machine.slice::x", "/machine.slice/x.scope"),
    ("kubepods.slice:cri:kubepods-pod1.slice", "/kubepods.slice/kubepods-pod1.slice"),
])
def test_systemd_paths_are_laid_out_as_systemd_does(form: str, path: str) -> None:
    assert is_systemd_path(form)
    assert expand_systemd(form) == path
    assert str(CgroupPath.parse(form, systemd=True)) == path


@pytest.mark.parametrize("form", [
    "/system.slice:docker:abc", "system.slice:docker", "notaslice:p:n", "a--b.slice:p:n",
    "system.slice:p:", "-x.slice:p:n",
])
def test_bad_systemd_paths_are_refused(form: str) -> None:
    with pytest.raises(CgroupError):
        CgroupPath.parse(form, systemd=True)


@pytest.mark.parametrize("path", ["/", "", "///", "/a/../b", "a/./b", "/a/..", "/x\0y"])
def test_paths_that_name_the_root_or_climb_are_refused(path: str) -> None:
    with pytest.raises(CgroupError) as refused:
        CgroupPath.parse(path, systemd=False)
    assert refused.value.hint


def test_absolute_and_relative_paths_land_where_a_runtime_puts_them() -> None:
    absolute = CgroupPath.parse("/docker/abc", systemd=False)
    relative = CgroupPath.parse("pods/abc", systemd=False)
    assert absolute.in_hierarchy("/somewhere/else") == PurePosixPath("/docker/abc")
    assert relative.in_hierarchy("/user.slice/me") == PurePosixPath("/user.slice/me/pods/abc")


def test_a_cgroup_outside_a_mounts_part_of_the_hierarchy_is_refused() -> None:
    h = Hierarchy(Path("/sys/fs/cgroup/pids"), "/kubepods", 1, frozenset({"pids"}))
    assert directory_of(h, PurePosixPath("/kubepods/pod1/c")) == Path(
        "/sys/fs/cgroup/pids/pod1/c")
    with pytest.raises(CgroupError):
        directory_of(h, PurePosixPath("/other/c"))


def test_the_spec_placement_is_checked_before_anything_is_made() -> None:
    spec = {"linux": {"cgroupsPath": "system.slice:docker:abc"}}
    placement = placement_from_spec(spec)
    assert placement is not None and placement.systemd  # told by its form
    assert placement_from_spec({"linux": {}}) is None
    with pytest.raises(SpecError) as refused:
        placement_from_spec({"linux": {"cgroupsPath": "/a/../../etc"}})
    assert "cgroupsPath" in refused.value.message
    with pytest.raises(SpecError):
        placement_from_spec({"linux": {"cgroupsPath": "/docker/abc"}}, systemd=True)


# --- what each version is written -------------------------------------------------------


def test_v1_gets_period_before_quota_and_unlimited_as_minus_one() -> None:
    cpu = Hierarchy(Path("/c"), "/", 1, frozenset({"cpu", "cpuacct"}))
    memory = Hierarchy(Path("/m"), "/", 1, frozenset({"memory"}))
    limits = Limits(cpu_quota_us=25_000, cpu_shares=512, memory_bytes=512 * MIB)
    assert v1_writes(cpu, limits) == [("cpu.cfs_period_us", "100000"),
                                      ("cpu.cfs_quota_us", "25000"), ("cpu.shares", "512")]
    assert v1_writes(memory, limits) == [("memory.limit_in_bytes", str(512 * MIB))]
    assert v1_writes(memory, Limits()) == [("memory.limit_in_bytes", "-1")]
    assert ("cpu.cfs_quota_us", "-1") in v1_writes(cpu, Limits())


def test_v2_gets_max_and_weights_only_for_controllers_it_has() -> None:
    limits = Limits(cpu_quota_us=25_000, cpu_shares=1024, memory_bytes=MIB)
    assert v2_writes(limits, {"cpu", "memory"}) == [
        ("cpu.max", "25000 100000"), ("cpu.weight", "39"), ("memory.max", str(MIB))]
    assert v2_writes(Limits(), {"cpu", "memory"}) == [("cpu.max", "max 100000"),
                                                      ("memory.max", "max")]
    assert v2_writes(limits, {"pids"}) == []


def test_shares_map_onto_the_whole_weight_range() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(1) == 1 and shares_to_weight(10**9) == 10000


def test_removal_leaves_what_is_not_a_cgroup_alone(tmp_path: Path) -> None:
    # A state record could name any directory: only cgroups are removed.
    victim = tmp_path / "not-a-cgroup"
    victim.mkdir()
    problems = remove_dirs([victim])
    assert victim.is_dir()
    assert problems and "not on a cgroup filesystem" in problems[0]


# --- a pod's limits ------------------------------------------------------------------


def _req(cpus: float | None = None, memory_mib: int | None = None, shares: int | None = None,
         counted: bool = True) -> ContainerRequest:
    return ContainerRequest(cpus, shares, memory_mib * MIB if memory_mib else None, counted)


def test_a_pods_limits_are_its_containers_summed_plus_the_overhead() -> None:
    limits = pod_limits([_req(0.5, 100, 512), _req(0.25, 50, 256)], CONFIG)
    overhead_cpus = CONFIG.sandbox_overhead_millicpus / 1000
    assert limits.cpu_quota_us == round((0.75 + overhead_cpus) * 100_000)
    assert limits.memory_bytes == (150 + CONFIG.sandbox_overhead_memory_mib) * MIB
    assert limits.cpu_shares == 768


def test_one_unlimited_container_leaves_the_pod_unlimited_in_that_dimension() -> None:
    limits = pod_limits([_req(0.5, 100), _req(None, 50)], CONFIG)
    assert limits.cpu_quota_us is None
    assert limits.memory_bytes is not None
    assert pod_limits([_req(0.5, None)], CONFIG).memory_bytes is None


def test_the_sandbox_container_of_a_cri_pod_asks_for_nothing() -> None:
    pause = container_request({"annotations": {"io.kubernetes.cri.container-type": "sandbox"},
                               "linux": {"resources": {"cpu": {"shares": 2}}}})
    assert not pause.counted
    assert pod_limits([pause], CONFIG) == Limits()
    app = container_request({"linux": {"resources": {"memory": {"limit": 64 * MIB},
                                                     "cpu": {"quota": 20000,
                                                             "period": 100000}}}})
    limits = pod_limits([pause, app], CONFIG)
    assert limits.memory_bytes == (64 + CONFIG.sandbox_overhead_memory_mib) * MIB
    assert limits.cpu_quota_us == 20_000 + CONFIG.sandbox_overhead_millicpus * 100


def test_an_update_keeps_what_it_leaves_out() -> None:
    old = _req(0.5, 100, 512)
    new = merge_update(old, {"memory": {"limit": 200 * MIB}})
    assert new.memory_bytes == 200 * MIB and new.cpus == 0.5 and new.shares == 512
    new = merge_update(old, {"cpu": {"quota": -1}})
    assert new.cpus is None and new.memory_bytes == 100 * MIB


def test_a_memory_limit_too_small_for_the_vm_is_refused_with_the_minimum() -> None:
    tight = RuntimeConfig(sandbox_overhead_memory_mib=0)
    limits = pod_limits([_req(memory_mib=64)], tight)
    with pytest.raises(SpecError) as refused:
        check_memory(limits, 512, tight)
    need = minimum_memory_mib(512)
    assert f"needs at least {need} MiB" in refused.value.message
    assert refused.value.hint is not None and str(need) in refused.value.hint
    check_memory(pod_limits([_req(memory_mib=need)], tight), 512, tight)
    # The default overhead covers a VM of the default size on its own.
    check_memory(pod_limits([_req(memory_mib=6)], CONFIG), 512, CONFIG)
    assert minimum_memory_mib(2048) > minimum_memory_mib(512)


def test_the_state_record_keeps_the_cgroups_pykata_made(tmp_path: Path) -> None:
    from pykata.runtime.state import SandboxState, StateFileError, read_state, write_state

    path = tmp_path / "state.json"
    write_state(path, SandboxState(id="a", key="a", front_end="oci", owner_pid=os.getpid(),
                                   owner_start=1, console_log="", created=0.0,
                                   cgroups=["/sys/fs/cgroup/cpu/x"]))
    assert read_state(path, SandboxState).cgroups == ["/sys/fs/cgroup/cpu/x"]
    path.write_text(path.read_text().replace('["/sys/fs/cgroup/cpu/x"]', "[1]"))
    with pytest.raises(StateFileError):
        read_state(path, SandboxState)


# --- review mends: hostile names, v2 placement, limits that must not break a pod -------


@pytest.mark.parametrize("path", ["/pods/cgroup.procs", "/memory.max", "/a/cpuset.cpus/b",
                                  "/a/b\nc", "/a/\x7f", "/a/\udcff"])
def test_names_like_control_files_or_with_control_characters_are_refused(path: str) -> None:
    with pytest.raises(CgroupError):
        CgroupPath.parse(path, systemd=False)


def test_names_with_dots_that_are_no_controller_are_kept() -> None:
    path = CgroupPath.parse("/kubepods.slice/pod-1.scope/memoryhog.x", systemd=False)
    assert path.parts == ("kubepods.slice", "pod-1.scope", "memoryhog.x")


def test_on_v2_a_relative_path_goes_beside_the_owners_cgroup() -> None:
    relative = CgroupPath.parse("pods/abc", systemd=False)
    assert relative.in_hierarchy("/user.slice/session.scope", v2=True) == PurePosixPath(
        "/user.slice/pods/abc")
    assert relative.in_hierarchy("/user.slice/session.scope") == PurePosixPath(
        "/user.slice/session.scope/pods/abc")


def test_an_owner_outside_its_cgroup_namespace_places_no_relative_path() -> None:
    with pytest.raises(CgroupError, match="outside its cgroup namespace"):
        CgroupPath.parse("pods/abc", systemd=False).in_hierarchy("/../../tmp")


def test_while_limits_change_the_wider_of_both_holds() -> None:
    old = Limits(cpu_quota_us=50_000, memory_bytes=512 * MIB)
    new = Limits(cpu_quota_us=80_000, memory_bytes=256 * MIB, cpu_shares=10)
    assert widest(old, new) == Limits(cpu_quota_us=80_000, memory_bytes=512 * MIB)
    assert widest(old, Limits()).memory_bytes is None


def _fake_v1(tmp_path: Path, controller: str) -> tuple[Hierarchy, Path]:
    h = Hierarchy(tmp_path, "/", 1, frozenset({controller}))
    pod = tmp_path / "parent" / "pod"
    pod.mkdir(parents=True)
    return h, pod


def test_a_v1_quota_is_held_to_its_parents(tmp_path: Path) -> None:
    h, pod = _fake_v1(tmp_path, "cpu")
    (pod.parent / "cpu.cfs_quota_us").write_text("52000\n")
    (pod.parent / "cpu.cfs_period_us").write_text("100000\n")
    held = _within_parent_quota(h, pod, Limits(cpu_quota_us=55_000))
    assert held.cpu_quota_us == 52_000
    assert _within_parent_quota(h, pod, Limits(cpu_quota_us=40_000)).cpu_quota_us == 40_000
    (pod.parent / "cpu.cfs_quota_us").write_text("-1\n")
    assert _within_parent_quota(h, pod, Limits(cpu_quota_us=55_000)).cpu_quota_us == 55_000


def test_a_cgroup_in_use_is_not_taken_over(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("1\n")
    with pytest.raises(CgroupError, match="holds 1 process"):
        _check_unused(busy)
    parent = tmp_path / "parent"
    (parent / "child").mkdir(parents=True)
    (parent / "cgroup.procs").write_text("")
    with pytest.raises(CgroupError, match="child cgroups"):
        _check_unused(parent)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cgroup.procs").write_text("")
    _check_unused(empty)


def test_memory_in_use_is_never_taken_away(tmp_path: Path) -> None:
    h, pod = _fake_v1(tmp_path, "memory")
    (pod / "memory.usage_in_bytes").write_text(str(300 * MIB))
    cgroup = HostCgroup(CgroupPath(("parent", "pod"), True), Layout((h,)), {h: pod})
    with pytest.raises(CgroupError, match="uses 300 MiB"):
        cgroup.apply(Limits(memory_bytes=256 * MIB))
    assert not (pod / "memory.limit_in_bytes").exists()
