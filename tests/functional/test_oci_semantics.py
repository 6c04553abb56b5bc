"""OCI settings as the container sees them, in a real VM: `pykata run --bundle`
with a config.json that asks for many things at once and a script that prints
what it sees, one line per check. One VM per group of checks: the process's
settings (on podman 4.3's spec), the linux section's, docker 20.10's spec with
the guest's hooks; plus exit statuses of commands that cannot run."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from pykata.assets.busybox_image import ensure_image
from pykata.errors import AgentError
from pykata.runtime.exit_status import CANNOT_EXECUTE, NOT_FOUND, start_failure_status
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.spec import default_spec
from tests.functional.conftest import Cli, run_in_sandbox, run_on_terminal

DATA = Path(__file__).resolve().parents[1] / "data"
_DONE = "semantics-done"


def _bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    """A bundle of `spec` with a copy of the busybox image as its rootfs; the
    host paths of its bind mounts become files and directories under tmp_path."""
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    shutil.copytree(ensure_image(), rootfs, symlinks=True)
    # The image's root is private to root; a container user must walk it.
    rootfs.chmod(0o755)
    spec["root"]["path"] = "rootfs"
    for index, mount in enumerate(spec.get("mounts", [])):
        if mount.get("type") != "bind" or mount["source"].startswith(str(tmp_path)):
            continue
        source = tmp_path / f"bind-{index}"
        if mount["destination"] in ("/dev/shm",):
            source.mkdir()
        else:
            source.write_text(f"bound at {mount['destination']}\n")
        mount["source"] = str(source)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _lines(text: str) -> dict[str, str]:
    """The script's `key=value` lines."""
    seen: dict[str, str] = {}
    for line in text.replace("\r", "").splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_0-9]+", key):
            seen[key] = value
    return seen


def _engine_spec(name: str, script: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((DATA / name).read_text())
    spec["process"]["args"] = ["sh", "-c", script]
    return spec


# --- the process: user, env, cwd, terminal, rlimits, capabilities, ... --------

_PROCESS_SCRIPT = r"""
echo "args=$0|$1"
echo "env=$FOO|$EMPTY|${HOSTNAME:-unset}"
echo "cwd=$(pwd)"
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "groups=$(id -G)"
[ -t 0 ] && [ -t 1 ] && echo "terminal=$(tty)"
echo "nofile=$(ulimit -Sn):$(ulimit -Hn)"
echo "nproc=$(ulimit -Su):$(ulimit -Hu)"
grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status \
    | tr -d '\t' | tr 'A-Z:' 'a-z='
echo "oom=$(cat /proc/self/oom_score_adj)"
echo "hostname=$(hostname)"
echo "domainname=$(cat /proc/sys/kernel/domainname)"
echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
echo "ping_group_range=$(cat /proc/sys/net/ipv4/ping_group_range | tr '\t' ' ')"
echo "resolv=$(cat /etc/resolv.conf)"
echo "cgroup=$(cut -d: -f3 /proc/self/cgroup)"
echo "pids_max=$(cat /sys/fs/cgroup/$(cut -d: -f3 /proc/self/cgroup)/pids.max)"
echo "mkdir_error=$(mkdir /tmp/newdir 2>&1 | sed 's/.*: //')"
""" + f"echo {_DONE}\n"


def test_process_settings_on_podmans_spec(guest_assets: object, tmp_path: Path) -> None:
    """podman 4.3's config.json (its seccomp profile, rlimits, cgroup mount,
    host netns path, net.* sysctl) with a process that asks for everything:
    a non-root user with extra groups, env, cwd, a terminal, podman's default
    rlimits, ambient capabilities, no_new_privs, seccomp's default errno
    (ENOSYS for a syscall the profile does not list), oom_score_adj, hostname,
    sysctls in the UTS and the pod's network namespace, a systemd cgroupsPath
    and LSM labels the guest has no use for."""
    spec = _engine_spec("podman-4.3.1-config.json", _PROCESS_SCRIPT)
    process = spec["process"]
    process["args"] += ["argzero", "first arg"]
    process["env"] += ["FOO=foo bar", "EMPTY="]
    process["cwd"] = "/home"
    process["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [44, 1002]}
    process["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1048576, "hard": 1048576},
                          {"type": "RLIMIT_NPROC", "soft": 4194304, "hard": 4194304}]
    # A non-root process keeps only its ambient capabilities across exec.
    process["capabilities"] = {
        "bounding": ["CAP_CHOWN", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"],
        "permitted": ["CAP_CHOWN", "CAP_NET_ADMIN"], "effective": ["CAP_CHOWN", "CAP_NET_ADMIN"],
        "inheritable": ["CAP_NET_ADMIN"], "ambient": ["CAP_NET_ADMIN"]}
    process["noNewPrivileges"] = True
    process["oomScoreAdj"] = 321
    process["apparmorProfile"] = "containers-default-0.50.1"
    process["selinuxLabel"] = "system_u:system_r:container_t:s0:c1,c2"
    spec["hostname"] = "semantics"
    linux = spec["linux"]
    linux["sysctl"].update({"kernel.domainname": "example.org", "net.ipv4.ip_forward": "1"})
    linux["cgroupsPath"] = "machine.slice:libpod-aae2b9cbf847.scope"
    linux["mountLabel"] = "system_u:object_r:container_file_t:s0:c1,c2"
    # A syscall the profile does not list gets its defaultErrnoRet, ENOSYS.
    for rule in linux["seccomp"]["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in ("mkdir", "mkdirat")]
    bundle = _bundle(tmp_path, spec)

    text, code = run_on_terminal(
        [sys.executable, "-m", "pykata.cli.main", "run", "-t", "--bundle", str(bundle)],
        24, 80, until=_DONE.encode())
    assert code == 0, text
    seen = _lines(text)
    assert seen["args"] == "argzero|first arg", text
    assert seen["env"] == "foo bar||aae2b9cbf847"
    assert seen["cwd"] == "/home"
    assert (seen["uid"], seen["gid"]) == ("1000", "1001")
    assert set(seen["groups"].split()) == {"1001", "44", "1002"}
    assert seen["terminal"].startswith("/dev/pts/")
    assert seen["nofile"] == "1048576:1048576"
    assert seen["nproc"] == "4194304:4194304"
    net_admin, bounding = 1 << 12, (1 << 0) | (1 << 12) | (1 << 21)
    for name in ("capinh", "capprm", "capeff", "capamb"):
        assert int(seen[name], 16) == net_admin, (name, text)
    assert int(seen["capbnd"], 16) == bounding
    assert seen["nonewprivs"] == "1"
    assert seen["seccomp"] == "2"  # podman's profile is a filter
    assert seen["oom"] == "321"
    assert seen["hostname"] == "semantics"
    assert seen["domainname"] == "example.org"
    assert seen["ip_forward"] == "1"
    assert seen["ping_group_range"] == "0 0"
    assert seen["resolv"] == "bound at /etc/resolv.conf"
    assert re.fullmatch(r"/pykata/run-[0-9a-f]+", seen["cgroup"]), seen["cgroup"]
    assert seen["pids_max"] == "2048"
    assert seen["mkdir_error"] == "Function not implemented"


# --- the linux section: mounts, masks, devices, seccomp, cgroups, ... ---------

_LINUX_SCRIPT = r"""
mounts() { grep " $1 " /proc/self/mounts | cut -d' ' -f3,4 | head -1; }
echo "proc=$(mounts /proc)"
echo "sys=$(mounts /sys)"
echo "pts=$(mounts /dev/pts)"
echo "mqueue=$(mounts /dev/mqueue)"
echo "cgroupfs=$(mounts /sys/fs/cgroup)"
echo "tmp=$(mounts /tmp)"
echo "tmp_mode=$(stat -c %a /tmp)"
echo "ro=$(mounts /ro)"
echo "ro_file=$(cat /ro/file)"
echo changed 2>/dev/null > /ro/file; echo "ro_write=$?"
echo from-guest > /rw/out; echo "rw_write=$?"
touch /rootfs-write 2>/dev/null; echo "root_write=$?"
echo "masked_file=$(cat /etc/secret | wc -c)"
echo "masked_dir=$(ls -A /opt/secretdir | wc -l)"
echo "timer_list=$(cat /proc/timer_list | wc -c)"
echo "firmware=$(ls -A /sys/firmware | wc -l)"
echo x 2>/dev/null > /proc/sys/kernel/domainname; echo "proc_sys_write=$?"
echo "hostname=$(hostname)"
echo "domainname=$(cat /proc/sys/kernel/domainname)"
echo "shmmni=$(cat /proc/sys/kernel/shmmni)"
echo "fuse=$(stat -c '%F %t:%T %a' /dev/fuse)"
echo "mydev=$(stat -c '%F %t:%T %a' /dev/mydev)"
echo x 2>/dev/null > /dev/fuse; echo "fuse_open=$?"
echo x > /dev/mydev; echo "mydev_write=$?"
echo "zero=$(head -c 3 /dev/zero | od -An -tx1 | tr -d ' ')"
mkdir /tmp/newdir 2>/dev/null; echo "mkdir=$?"
echo "mkdir_error=$(mkdir /tmp/newdir 2>&1 | sed 's/.*: //')"
echo "pid1=$(cat /proc/1/comm)"
echo "cgroup=$(cat /proc/self/cgroup)"
echo "memory_max=$(cat /sys/fs/cgroup/memory.max)"
echo "pids_max=$(cat /sys/fs/cgroup/pids.max)"
echo "cpu_max=$(cat /sys/fs/cgroup/cpu.max)"
""" + f"echo {_DONE}\n"


def test_linux_settings(cli: Cli, tmp_path: Path) -> None:
    """A read-only rootfs with proc, sysfs, devpts, mqueue, cgroup, a tmpfs
    with options and binds read-only and read-write; masked and read-only
    paths; sysctls in the UTS and IPC namespaces; device nodes and device
    cgroup rules; a seccomp profile denying mkdir (naming syscalls libseccomp
    may not know); memory, pids and cpu limits; a cgroup namespace; and what
    docker or kubelet write that cannot apply in the guest (blockIO, network
    classes, huge page limits, a host network namespace path)."""
    spec = default_spec(["sh", "-c", _LINUX_SCRIPT], hostname="linux-settings")
    spec["root"]["readonly"] = True
    rodir, rwdir = tmp_path / "rodir", tmp_path / "rwdir"
    rodir.mkdir()
    rwdir.mkdir()
    (rodir / "file").write_text("read-only content\n")
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/tmp"] + [
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "size=2m", "mode=1770"]},
        {"destination": "/ro", "type": "bind", "source": str(rodir), "options": ["rbind", "ro"]},
        {"destination": "/rw", "type": "bind", "source": str(rwdir), "options": ["rbind", "rw"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["ro", "nosuid", "noexec", "nodev"]},
    ]
    linux = spec["linux"]
    linux["namespaces"] += [{"type": "cgroup"},
                            {"type": "network", "path": "/var/run/netns/cni-0123"}]
    linux["maskedPaths"] += ["/etc/secret", "/opt/secretdir"]
    linux["sysctl"] = {"kernel.domainname": "linux.example", "kernel.shmmni": "999"}
    linux["devices"] = [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o600,
         "uid": 0, "gid": 0},
        {"path": "/dev/mydev", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666}]
    linux["resources"] = {
        "devices": [{"allow": False, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}],
        "memory": {"limit": 100 << 20}, "pids": {"limit": 77},
        "cpu": {"quota": 50000, "period": 100000, "shares": 0},
        "blockIO": {"weight": 0}, "network": {"classID": 5},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 0}]}
    linux["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["fchmodat2", "map_shadow_stack", "no_such_syscall"],
             "action": "SCMP_ACT_ERRNO"}]}
    bundle = _bundle(tmp_path, spec)
    rootfs = bundle / "rootfs"
    # A read-only rootfs is read-only on the host already, so crun cannot make
    # mount points in it (runc, which remounts it read-only last, can): the
    # image has them, as images for read-only use do.
    (rootfs / "ro").mkdir()
    (rootfs / "rw").mkdir()
    (rootfs / "etc" / "secret").write_text("secret\n")
    (rootfs / "opt" / "secretdir").mkdir(parents=True)
    (rootfs / "opt" / "secretdir" / "key").write_text("secret\n")

    result = cli("run", "--bundle", str(bundle))
    assert result.returncode == 0, result.err
    seen = _lines(result.out)
    assert seen["proc"].startswith("proc rw"), result.out
    assert seen["sys"].startswith("sysfs ro")
    assert seen["pts"].startswith("devpts rw") and "ptmxmode=666" in seen["pts"]
    assert seen["mqueue"].startswith("mqueue rw")
    assert seen["cgroupfs"].startswith("cgroup2 ro")
    assert seen["tmp"].startswith("tmpfs rw,nosuid,nodev")
    assert "size=2048k" in seen["tmp"] and "mode=1770" in seen["tmp"]
    assert seen["tmp_mode"] == "1770"
    assert seen["ro"].split()[1].startswith("ro")
    assert seen["ro_file"] == "read-only content"
    assert seen["ro_write"] != "0" and (rodir / "file").read_text() == "read-only content\n"
    assert seen["rw_write"] == "0" and (rwdir / "out").read_text() == "from-guest\n"
    assert seen["root_write"] != "0" and not (rootfs / "rootfs-write").exists()
    assert seen["masked_file"] == "0"
    assert seen["masked_dir"] == "0"
    assert seen["timer_list"] == "0"
    assert seen["firmware"] == "0"
    assert seen["proc_sys_write"] != "0"
    assert seen["hostname"] == "linux-settings"
    assert seen["domainname"] == "linux.example"
    assert seen["shmmni"] == "999"
    assert seen["fuse"] == "character special file a:e5 600"
    assert seen["mydev"] == "character special file 1:3 666"
    assert seen["fuse_open"] != "0"  # the device cgroup allows 1:3 and 1:5 only
    assert seen["mydev_write"] == "0"
    assert seen["zero"] == "000000"
    assert seen["mkdir"] != "0"
    assert seen["mkdir_error"] == "Operation not permitted"
    assert seen["pid1"] == "sh"
    assert seen["cgroup"] == "0::/"
    assert seen["memory_max"] == str(100 << 20)
    assert seen["pids_max"] == "77"
    assert seen["cpu_max"] == "50000 100000"


# --- docker's spec, and the hooks that run in the guest -----------------------

# createContainer runs in the container's namespaces before pivot_root, so
# the container's rootfs is where the state names it (crun adds "root").
_CREATE_HOOK = r"""
state=$(cat)
root=$(echo "$state" | sed 's/.*"root":"\([^"]*\)".*/\1/')
echo "$state" > "$root/hook-create.json"
readlink /proc/self/ns/mnt > "$root/hook-create.mntns"
echo "$HOOK_VAR" > "$root/hook-create.env"
"""
_START_HOOK = r"""cat > /hook-start.json; readlink /proc/self/ns/mnt > /hook-start.mntns"""
_DOCKER_SCRIPT = r"""
echo "create_state=$(cat /hook-create.json)"
echo "create_env=$(cat /hook-create.env)"
echo "start_state=$(cat /hook-start.json)"
echo "mntns=$(readlink /proc/self/ns/mnt)"
echo "create_mntns=$(cat /hook-create.mntns)"
echo "start_mntns=$(cat /hook-start.mntns)"
echo "cgroup=$(cut -d: -f3 /proc/self/cgroup)"
echo "seccomp=$(grep Seccomp: /proc/self/status | tr -d '\t' | cut -d: -f2)"
echo "caps=$(grep CapEff: /proc/self/status | tr -d '\t' | cut -d: -f2)"
""" + f"echo {_DONE}\nkill -USR1 $$\n"


def test_dockers_spec_with_hooks_in_the_guest(cli: Cli, tmp_path: Path) -> None:
    """docker 20.10's config.json (its default seccomp profile, device rules,
    blockIO, net.* sysctls, cgroup mount, AppArmor profile, libnetwork's
    prestart hook, which is the host's) with a systemd cgroupsPath and
    createContainer and startContainer hooks: those run in the guest, in the
    container's mount namespace, with the state on stdin. Without a PID
    namespace of its own (docker run --pid=host) the container's process can
    die of its own signal, and the run exits 128+N."""
    spec = _engine_spec("docker-20.10.24-config.json", _DOCKER_SCRIPT)
    spec["linux"]["cgroupsPath"] = "system.slice:docker:f8ef1bfd4f59"
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"]
                                   if ns["type"] != "pid"]
    spec["annotations"] = {"org.example/note": "from the spec"}
    spec["hooks"]["createContainer"] = [{
        "path": "/bin/sh", "args": ["sh", "-c", _CREATE_HOOK], "env": ["HOOK_VAR=set"],
        "timeout": 30}]
    spec["hooks"]["startContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", _START_HOOK]}]
    bundle = _bundle(tmp_path, spec)

    result = cli("run", "--bundle", str(bundle))
    assert result.returncode == 128 + 10, (result.out, result.err)  # SIGUSR1
    seen = _lines(result.out)
    container_id = seen["cgroup"].removeprefix("/pykata/")
    created = json.loads(seen["create_state"])
    assert created["id"] == container_id
    # crun 1.8.1 says "created" (runtime-spec: "creating" during create).
    assert created["status"] in ("created", "creating")
    assert created["annotations"]["org.example/note"] == "from the spec"
    assert seen["create_env"] == "set"
    started = json.loads(seen["start_state"])
    assert started["id"] == container_id
    assert seen["create_mntns"] == seen["mntns"] == seen["start_mntns"]
    assert seen["seccomp"] == "2"
    assert seen["caps"] == "00000000a80425fb"  # docker's 14 default capabilities
    # The hooks wrote into the rootfs, which is the host's directory.
    assert json.loads((bundle / "rootfs" / "hook-create.json").read_text())["id"] == (
        container_id)


# --- commands that cannot run -------------------------------------------------

def test_a_command_not_found_exits_127(cli: Cli) -> None:
    """`pykata run -- CMD` with no such CMD exits 127, as docker and a shell do,
    with crun's words, which docker and podman read."""
    result = cli("run", "--", "no-such-command")
    assert result.returncode == NOT_FOUND, result.err
    assert ("executable file `no-such-command` not found in $PATH: "
            "No such file or directory") in result.err


@pytest.mark.asyncio(loop_scope="session")
async def test_commands_that_cannot_run(shared_sandbox: Sandbox) -> None:
    """Not found (127); no x bit or a directory (126); the same for an exec'd
    process in a running container."""
    from pykata.runtime.container import Container, overlay_rootfs

    cases = (("noexec-missing", "/nonexistent", NOT_FOUND),
             ("noexec-nox", "/etc/passwd", CANNOT_EXECUTE),
             ("noexec-dir", "/etc", CANNOT_EXECUTE))
    for container_id, executable, status in cases:
        with pytest.raises(AgentError) as err:
            await run_in_sandbox(shared_sandbox, [executable], container_id=container_id)
        assert start_failure_status(err.value) == status, err.value
        assert executable in err.value.message
    container = Container(shared_sandbox, "noexec-exec")
    try:
        container.share_rootfs(overlay_rootfs(ensure_image(), container.scratch()))
        await container.create(default_spec(["sleep", "600"]))
        await container.start()
        with pytest.raises(AgentError) as err:
            await container.exec("missing", {"args": ["missing-tool"], "cwd": "/",
                                             "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
        assert start_failure_status(err.value) == NOT_FOUND, err.value
        assert "missing-tool" in err.value.message
        await container.kill(9)
        assert await container.wait() == 137
    finally:
        await container.delete()

