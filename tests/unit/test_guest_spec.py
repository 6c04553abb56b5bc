"""What the agent makes of the specs docker and podman write (tests/data/),
and of the settings that do not apply in the guest."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import guest_spec
from pykata.agent.crun import last_error
from pykata.agent.sysctls import sysctl_path, write_sysctls
from pykata.protocols.oci_spec import spec_from_json, spec_to_json
from pykata.ttrpc import Code, StatusError

DATA = Path(__file__).resolve().parents[1] / "data"
ALL = frozenset({"cpuset", "cpu", "io", "memory", "pids"})  # the guest's controllers


def engine_spec(name: str) -> dict[str, Any]:
    """An engine's config.json as the agent receives it: through the protocol."""
    raw = json.loads((DATA / name).read_text())
    return spec_to_json(spec_from_json(raw))


def _guest(spec: dict[str, Any], cid: str = "c1") -> dict[str, Any]:
    return guest_spec.for_guest(spec, cid, sandbox_pid=None, share_pid_ns=False,
                                controllers=ALL)


def test_docker_spec_for_the_guest() -> None:
    """docker 20.10: the libnetwork prestart hook, the AppArmor profile, the
    systemd or cgroupfs path and blockIO {"weight": 0} are the host's; the
    rest (seccomp profile, devices rules, masked paths, cgroup mount) stays."""
    spec = engine_spec("docker-20.10.24-config.json")
    before = copy.deepcopy(spec)
    guest = _guest(spec)
    assert "hooks" not in guest
    assert "apparmorProfile" not in guest["process"]
    assert guest["linux"]["cgroupsPath"] == "/pykata/c1"
    assert "blockIO" not in guest["linux"]["resources"]
    assert guest["linux"]["resources"]["devices"] == before["linux"]["resources"]["devices"]
    assert guest["linux"]["seccomp"] == before["linux"]["seccomp"]
    assert [ns["type"] for ns in guest["linux"]["namespaces"]] == [
        "mount", "uts", "pid", "ipc"]
    assert {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["ro", "nosuid", "noexec", "nodev"]} in guest["mounts"]
    # ip_unprivileged_port_start and ping_group_range are the pod network's.
    pod = guest_spec.take_pod_sysctls(guest)
    assert pod == {"net.ipv4.ip_unprivileged_port_start": "0",
                   "net.ipv4.ping_group_range": "0 2147483647"}
    assert "sysctl" not in guest["linux"]


def test_podman_spec_for_the_guest() -> None:
    """podman 4.3: its network namespace path names a host netns; its
    ping_group_range sysctl is the pod network's; rlimits stay as they are."""
    guest = _guest(engine_spec("podman-4.3.1-config.json"))
    assert all("path" not in ns and ns["type"] != "network"
               for ns in guest["linux"]["namespaces"])
    assert guest_spec.take_pod_sysctls(guest) == {"net.ipv4.ping_group_range": "0 0"}
    assert guest["process"]["rlimits"][0] == {"type": "RLIMIT_NOFILE", "hard": 1048576,
                                              "soft": 1048576}
    assert guest["linux"]["cgroupsPath"] == "/pykata/c1"
    # ENOSYS for syscalls the profile does not know: carried to crun.
    assert guest["linux"]["seccomp"]["defaultErrnoRet"] == 38


def test_systemd_cgroup_paths_and_lsm_labels_are_dropped() -> None:
    """systemd-style cgroupsPath, SELinux labels: the guest has neither."""
    for path in ("system.slice:docker:abc", "machine.slice:libpod-abc.scope", None):
        spec: dict[str, Any] = {
            "process": {"args": ["sh"], "selinuxLabel": "system_u:system_r:container_t:s0"},
            "linux": {"mountLabel": "system_u:object_r:container_file_t:s0"}}
        if path is not None:
            spec["linux"]["cgroupsPath"] = path
        guest = _guest(spec, "web")
        assert guest["linux"]["cgroupsPath"] == "/pykata/web"
        assert "selinuxLabel" not in guest["process"]
        assert "mountLabel" not in guest["linux"]


def test_only_the_guests_hooks_reach_crun() -> None:
    """createContainer and startContainer run in the container's namespaces,
    in the guest; the other phases are the host's."""
    spec: dict[str, Any] = {"process": {"args": ["sh"]}, "hooks": {
        "prestart": [{"path": "/proc/1/exe", "args": ["libnetwork-setkey"]}],
        "createRuntime": [{"path": "/host/cr"}],
        "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"], "timeout": 5}],
        "startContainer": [{"path": "/bin/true"}],
        "poststart": [{"path": "/host/ps"}],
        "poststop": [{"path": "/host/pst"}],
    }}
    guest = _guest(spec)
    assert guest["hooks"] == {
        "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"], "timeout": 5}],
        "startContainer": [{"path": "/bin/true"}]}
    assert "hooks" not in _guest({"process": {"args": ["sh"]},
                                  "hooks": {"poststop": [{"path": "/x"}]}})


def test_resources_that_name_host_devices_or_missing_controllers_are_dropped() -> None:
    """blockIO (host block devices), network (cgroup v1 only), hugepageLimits
    when the guest has no hugetlb controller; the same for an update."""
    resources = {"blockIO": {"weight": 0}, "network": {"classID": 5},
                 "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
                 "memory": {"limit": 1 << 26}, "pids": {"limit": 50}}
    out = guest_spec.guest_resources(resources, "c1", ALL)
    assert out == {"memory": {"limit": 1 << 26}, "pids": {"limit": 50}}
    kept = guest_spec.guest_resources(resources, "c1", ALL | {"hugetlb"})
    assert kept["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0}]
    assert "blockIO" in resources  # the caller's dict is left alone


def test_pod_sysctls_stay_when_the_container_has_its_own_network() -> None:
    """Only a container in the VM's network namespace hands net.* to the agent;
    the others are crun's (kernel.*, fs.mqueue.*)."""
    spec = {"linux": {"namespaces": [{"type": "network"}],
                      "sysctl": {"net.ipv4.ip_forward": "1"}}}
    assert guest_spec.take_pod_sysctls(spec) == {}
    spec = {"linux": {"sysctl": {"net.ipv4.ip_forward": "1", "kernel.domainname": "x"}}}
    assert guest_spec.take_pod_sysctls(spec) == {"net.ipv4.ip_forward": "1"}
    assert spec["linux"]["sysctl"] == {"kernel.domainname": "x"}


def test_sysctls_are_written_below_proc_sys_only(tmp_path: Path) -> None:
    """Dots are separators; a name that climbs out is refused; an unknown one
    is named."""
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_forward").write_text("0")
    write_sysctls({"net.ipv4.ip_forward": "1"}, tmp_path)
    assert (tmp_path / "net" / "ipv4" / "ip_forward").read_text() == "1"
    assert sysctl_path("net.ipv4.conf.eth0/100.forwarding", tmp_path) == (
        tmp_path / "net/ipv4/conf/eth0/100/forwarding")
    for bad in ("net..x", "net/../../etc/passwd", ""):
        with pytest.raises(StatusError) as err:
            sysctl_path(bad, tmp_path)
        assert err.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(StatusError, match=r"sysctl net\.nope='1'") as err:
        write_sysctls({"net.nope": "1"}, tmp_path)
    assert err.value.code == Code.INVALID_ARGUMENT


def test_crun_messages_logged_through_its_parent_are_unwrapped(tmp_path: Path) -> None:
    """A failing createContainer hook is reported by crun's container process,
    whose JSON line crun's parent logs again as its own message."""
    log = tmp_path / "crun.log"
    inner = json.dumps({"msg": "error executing hook `/bin/sh` (exit code: 3)",
                        "level": "error"})
    log.write_text(json.dumps({"msg": inner, "level": "error"}) + "\n")
    assert last_error(log) == "error executing hook `/bin/sh` (exit code: 3)"
