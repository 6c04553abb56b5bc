"""`pykata-oci` driven as runc's users drive it, on real VMs.

Each container boots a VM of its own (3-5 s under TCG), so the tests pack
several checks into one container where they do not interfere.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykata import assets
from pykata.host.hostio import set_window_size
from pykata.runtime.paths import run_root
from tests.functional.conftest import pykata_cli, qemu_processes, unexpected_leftovers
from tests.functional.oci_tools import ConsoleReceiver, Oci, Waiter, make_bundle

LOOP = ["sh", "-c", "trap 'echo got-term; exit 5' TERM; while :; do sleep 0.2; done"]


@pytest.fixture
def oci(tmp_path: Path, guest_assets: assets.AssetPaths) -> Oci:
    return Oci(tmp_path / "root", log=tmp_path / "oci-log.json")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _vm_of(oci: Oci, cid: str) -> list[str]:
    """The QEMU of one container (other tests' VMs may run beside it)."""
    key = json.loads((oci.root / cid / "state.json").read_text())["sandbox_key"]
    return [line for line in qemu_processes() if f"-name pykata-{key} " in line]


def _last_error(log: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    errors = [entry for entry in lines if entry["level"] == "error"]
    assert errors, f"no error line in {log}: {lines}"
    return errors[-1]


def test_lifecycle_pid_contract_stdio_and_signals(oci: Oci, tmp_path: Path) -> None:
    """create -> created (the pid lives, a subreaper's child) -> start ->
    running -> SIGTERM sent to the pid reaches the container -> the pid
    exits with the container's status, output intact -> delete."""
    payload = os.urandom(300_000)
    bundle = make_bundle(tmp_path / "b", ["sh", "-c",
                         "head -c 300000 | sha256sum; echo to-stderr >&2; " + LOOP[2]])
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "c1", stdin=payload)
    created = waiter.wait_created()
    assert created["rc"] == 0, waiter.finish()
    pid = created["pid"]
    state = oci.state("c1")
    assert state["status"] == "created" and state["pid"] == pid and _alive(pid)
    assert state["bundle"] == str(bundle) and state["ociVersion"]
    assert oci("start", "c1").returncode == 0
    assert oci.state("c1")["status"] == "running"
    listed = json.loads(oci("list", "--format", "json").out)
    assert [(c["id"], c["status"]) for c in listed] == [("c1", "running")]
    assert oci("list", "-q").out.split() == ["c1"]
    time.sleep(1)
    os.kill(pid, signal.SIGTERM)  # to the pid itself, as conmon may do
    ended = waiter.finish()
    assert ended["status"] == 5, ended
    assert hashlib.sha256(payload).hexdigest() in ended["stdout"]
    assert "got-term" in ended["stdout"] and ended["stderr"] == "to-stderr\n"
    stopped = oci.state("c1")
    assert stopped["status"] == "stopped" and stopped["pid"] == 0
    assert oci("delete", "c1").returncode == 0
    assert oci("state", "c1").returncode == 1
    assert "does not exist" in _last_error(oci.log)["msg"]  # type: ignore[arg-type]


def test_kill_exec_ps_events_pause_update(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", LOOP)
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "c2")
    assert waiter.wait_created()["rc"] == 0
    try:
        # Wrong moves, each refused with runc's kind of message and status 1.
        assert oci("exec", "c2", "true").returncode == 1  # created, not running
        assert oci("start", "c2").returncode == 0
        again = oci("start", "c2")
        assert again.returncode == 1 and "running" in _last_error(oci.log)["msg"]
        busy = oci("delete", "c2")
        assert busy.returncode == 1
        assert "is running: cannot delete it" in _last_error(oci.log)["msg"]

        result = oci("exec", "c2", "sh", "-c", "echo exec-out; echo exec-err >&2; exit 4")
        assert (result.returncode, result.out, result.err) == (4, "exec-out\n", "exec-err\n")
        env = oci("exec", "--env", "X=42", "--cwd", "/tmp", "--user", "65534:65534", "c2",
                  "sh", "-c", "echo $X $(pwd) $(id -u):$(id -g)")
        assert env.out == "42 /tmp 65534:65534\n", env.err
        process = tmp_path / "process.json"
        process.write_text(json.dumps({"args": ["sh", "-c", "exit 9"], "cwd": "/",
                                       "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}))
        assert oci("exec", "--process", str(process), "c2").returncode == 9

        # exec --detach --pid-file: the pid stands for the exec'd process.
        detached = Waiter(oci, "exec", "--detach", "--pid-file", str(tmp_path / "epid"),
                          "c2", "sh", "-c", "echo detached; sleep 1; exit 6")
        assert detached.wait_created()["rc"] == 0
        done = detached.finish()
        assert done["status"] == 6 and done["stdout"] == "detached\n", done

        table = oci("ps", "c2")
        assert table.returncode == 0 and len(table.out.split()) >= 4
        pids = json.loads(oci("ps", "--format", "json", "c2").out)
        assert pids[0] == oci.state("c2")["pid"]
        stats = json.loads(oci("events", "--stats", "c2").out)
        assert stats["type"] == "stats" and stats["data"]["memory"]["usage"]["usage"] > 0

        assert oci("update", "--pids-limit", "77", "c2").returncode == 0
        # The guest's cgroup of the container took the limit.
        after = json.loads(oci("events", "--stats", "c2").out)
        assert after["data"]["pids"]["limit"] == 77, after

        assert oci("pause", "c2").returncode == 0
        assert oci.state("c2")["status"] == "paused"
        assert oci("exec", "c2", "true").returncode == 1
        assert oci("resume", "c2").returncode == 0
        assert oci.state("c2")["status"] == "running"

        assert oci("kill", "c2", "NOPE").returncode == 1
        assert oci("kill", "c2", "KILL").returncode == 0
        ended = waiter.finish()
        assert ended["status"] == 128 + signal.SIGKILL
        assert oci("kill", "c2", "9").returncode == 1  # stopped now
    finally:
        oci("delete", "--force", "c2")
    assert oci("list", "-q").out == ""


def test_console_socket_and_resize(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ["sh"], terminal=True)
    console = ConsoleReceiver(tmp_path / "console.sock")
    try:
        created = oci("create", "--bundle", str(bundle), "--console-socket",
                      str(console.path), "--pid-file", str(tmp_path / "pid"), "c3")
        assert created.returncode == 0, created.err
        master = console.wait()
        assert console.name.startswith("/dev/pts/")
        assert oci("start", "c3").returncode == 0
        set_window_size(master, 33, 111)
        time.sleep(0.5)
        os.write(master, b"tty; stty size; echo mark-$((6*7))\n")
        seen = console.read_until(b"mark-42")
        assert b"/dev/pts/" in seen and b"33 111" in seen, seen
        # A terminal exec through another console socket.
        exec_console = ConsoleReceiver(tmp_path / "exec.sock")
        proc = subprocess.Popen(oci.argv("exec", "--tty", "--console-socket",
                                         str(exec_console.path), "c3", "sh", "-c",
                                         "test -t 0 && echo exec-tty-ok"))
        exec_console.wait()
        assert b"exec-tty-ok" in exec_console.read_until(b"exec-tty-ok")
        assert proc.wait(60) == 0
        exec_console.close()
        os.write(master, b"exit 3\n")
        _wait_until(lambda: oci.state("c3")["status"] == "stopped", "the shell to exit")
    finally:
        oci("delete", "--force", "c3")
        console.close()


def test_run_exit_statuses_and_spec_features_version(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "exit 0"])
    config = json.loads((bundle / "config.json").read_text())
    for args, status in ((["sh", "-c", "exit 7"], 7), (["/no/such/program"], 127),
                         (["/etc/passwd"], 126),
                         (["sh", "-c", "sh -c 'kill -USR1 $$'; exit $?"], 128 + 10)):
        config["process"]["args"] = args
        (bundle / "config.json").write_text(json.dumps(config))
        result = oci("run", "--bundle", str(bundle), f"r{status}")
        assert result.returncode == status, (args, result)
    assert oci("list", "-q").out == ""
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    assert oci("spec", "--bundle", str(spec_dir)).returncode == 0
    written = json.loads((spec_dir / "config.json").read_text())
    assert written["root"]["path"] == "rootfs" and written["process"]["args"]
    assert oci("spec", "--bundle", str(spec_dir)).returncode == 1  # exists already
    features = json.loads(oci("features").out)
    assert "poststop" in features["hooks"]
    version = oci("--version")
    assert version.returncode == 0 and "spec: 1.3.0" in version.out


def test_bad_input_is_refused_and_leaves_nothing(oci: Oci, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = oci("create", "--bundle", str(empty), "x1")
    assert result.returncode == 1 and "config.json" in _last_error(oci.log)["msg"]
    wrong = make_bundle(tmp_path / "wrong", ["true"])
    spec = json.loads((wrong / "config.json").read_text())
    spec["process"]["args"] = "true"  # a string where a list belongs
    (wrong / "config.json").write_text(json.dumps(spec))
    assert oci("create", "--bundle", str(wrong), "x2").returncode == 1
    assert "process.args" in _last_error(oci.log)["msg"]
    assert oci("frobnicate", "x").returncode == 1
    assert oci("create", "--no-such-flag", "x").returncode == 1
    assert "unrecognized" in _last_error(oci.log)["msg"]
    assert oci("start", "missing").returncode == 1
    assert oci("delete", "missing").returncode == 1
    assert oci("delete", "--force", "missing").returncode == 0
    tty_bundle = make_bundle(tmp_path / "tty", ["sh"], terminal=True)
    nobody = oci("create", "--bundle", str(tty_bundle), "--console-socket",
                 str(tmp_path / "nobody.sock"), "x3")
    assert nobody.returncode == 1 and "console socket" in _last_error(oci.log)["msg"]
    no_socket = oci("create", "--bundle", str(tty_bundle), "x4")
    assert no_socket.returncode == 1 and "console-socket" in _last_error(oci.log)["msg"]
    assert not list((tmp_path / "root").iterdir())
    assert not unexpected_leftovers()
    # An id in use: refused, and the first container is untouched.
    good = make_bundle(tmp_path / "good", LOOP)
    assert oci("create", "--bundle", str(good), "x5").returncode == 0
    try:
        dup = oci("create", "--bundle", str(good), "x5")
        assert dup.returncode == 1 and "exists" in _last_error(oci.log)["msg"]
        assert oci.state("x5")["status"] == "created"
    finally:
        assert oci("delete", "x5").returncode == 0  # created: no force needed
    assert not list((tmp_path / "root").iterdir())


def test_monitor_killed_takes_the_vm_and_delete_clears(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", LOOP)
    assert oci("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"),
               "k1").returncode == 0
    pid = int((tmp_path / "pid").read_text())
    assert oci("start", "k1").returncode == 0
    assert _vm_of(oci, "k1")
    os.kill(pid, signal.SIGKILL)
    _wait_until(lambda: not _vm_of(oci, "k1"), "QEMU to die with its monitor")
    assert oci.state("k1")["status"] == "stopped"
    assert unexpected_leftovers(), "the killed monitor's mounts should still be there"
    cleaned = pykata_cli("cleanup")
    assert cleaned.returncode == 0 and "removing sandbox" in cleaned.out, cleaned.out
    assert not unexpected_leftovers()
    assert oci("delete", "--force", "k1").returncode == 0
    assert not (tmp_path / "root" / "k1").exists()


def test_delete_force_clears_a_killed_monitor(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", LOOP)
    assert oci("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"),
               "k2").returncode == 0
    assert _vm_of(oci, "k2")
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
    _wait_until(lambda: not _vm_of(oci, "k2"), "QEMU to die with its monitor")
    assert oci("delete", "--force", "k2").returncode == 0
    assert not unexpected_leftovers()


# Both namespaces get the same links in the same order, so the same indexes:
# a redirect recorded as {eth0: index} matches in either.
VETH = ("ip link add eth0 type veth peer name eth1 && ip addr add 10.9.8.2/24 dev eth0 "
        "&& ip link set eth0 up")
SETKEY = f"""
import json, subprocess, sys
pid = json.load(sys.stdin)["pid"]
subprocess.run(["nsenter", "-t", str(pid), "-n", "sh", "-c", {VETH!r}], check=True)
"""


def _ingress(netns: str) -> bool:
    """Whether eth0 of the namespace at `netns` has an ingress qdisc."""
    shown = subprocess.run(["nsenter", f"--net={netns}", "tc", "qdisc", "show", "dev", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    return "ingress" in shown


def _spawn_with_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """`argv` started as process `pid` (free again): what pid reuse does by
    chance, done on purpose through ns_last_pid."""
    for _ in range(200):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail(f"could not start a process as pid {pid}")


@pytest.mark.parametrize("clearer", ["delete", "cleanup"])
def test_a_killed_monitors_namespace_is_never_taken_for_its_pids_next_owner(
        oci: Oci, tmp_path: Path, clearer: str) -> None:
    """A container with a network namespace of its own (docker's, set up by a
    prestart hook in the monitor's): after its monitor is killed and its pid
    is another process's, `delete` or `pykata cleanup` remove the VM's
    redirect in the container's namespace, and leave that process's alone."""
    setkey = tmp_path / "setkey.py"
    setkey.write_text(SETKEY)
    bundle = make_bundle(tmp_path / "b", LOOP, hooks={"prestart": [{
        "path": sys.executable, "args": [sys.executable, str(setkey)],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}]})
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"].append({"type": "network"})
    (bundle / "config.json").write_text(json.dumps(spec))
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "n1")
    assert waiter.wait_created()["rc"] == 0
    pid = int((tmp_path / "pid").read_text())
    victim: subprocess.Popen[bytes] | None = None
    # Held here, so the container's namespace can be looked at after delete.
    container_ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        held = f"/proc/{os.getpid()}/fd/{container_ns}"
        assert _ingress(held), "the VM's redirect should be on the container's eth0"
        key = json.loads((oci.root / "n1" / "state.json").read_text())["sandbox_key"]
        recorded = json.loads((run_root() / "sandboxes" / key / "state.json").read_text())
        assert recorded["netns"] == str(oci.root / "n1" / "netns"), recorded
        os.kill(pid, signal.SIGKILL)
        assert waiter.finish()["status"] == -signal.SIGKILL  # reaped: the pid is free again
        _wait_until(lambda: not _vm_of(oci, "n1"), "QEMU to die with its monitor")
        victim = _spawn_with_pid(pid, ["unshare", "-n", "sh", "-c",
                                       f"{VETH} && tc qdisc add dev eth0 ingress "
                                       "&& echo ready && exec sleep 600"])
        assert victim.stdout is not None and victim.stdout.readline() == b"ready\n"
        assert _ingress(f"/proc/{pid}/ns/net")
        if clearer == "cleanup":
            cleaned = pykata_cli("cleanup")
            assert cleaned.returncode == 0, cleaned.out + cleaned.err
            assert _ingress(f"/proc/{pid}/ns/net"), \
                "cleanup removed a qdisc in the namespace of the process that took the pid"
            assert "releasing the network namespace of OCI container n1" in cleaned.out, \
                cleaned.out
        assert oci("delete", "--force", "n1").returncode == 0
        assert _ingress(f"/proc/{pid}/ns/net"), \
            "delete removed a qdisc in the namespace of the process that took the pid"
        assert not _ingress(held), "the VM's redirect should be gone from the container's eth0"
    finally:
        os.close(container_ns)
        if victim is not None:
            victim.kill()
            victim.wait()
        oci("delete", "--force", "n1")  # a failed check leaves no VM running
    assert not (oci.root / "n1").exists()
    assert not unexpected_leftovers()


def test_oci_semantics_and_host_hooks(oci: Oci, tmp_path: Path) -> None:
    """What runc's users check from inside: rlimits, a masked path, a
    read-only path, the hostname, the user; and the host hooks, each run
    where the runtime-spec says with the state on stdin."""
    hooks_out = tmp_path / "hooks"
    hooks_out.mkdir()

    def hook(name: str) -> dict[str, object]:
        return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {hooks_out}/{name}"]}

    script = ("grep 'Max open files' /proc/self/limits; hostname; "
              "wc -c < /etc/group; "
              "touch /etc/ro-test 2>/dev/null && echo etc-writable || echo etc-readonly; "
              "id -u; exit 0")
    bundle = make_bundle(
        tmp_path / "b", ["sh", "-c", script], hostname="semantics-host",
        process={"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 4321, "hard": 5432}],
                 "user": {"uid": 1000, "gid": 1000}},
        linux={"maskedPaths": ["/etc/group"], "readonlyPaths": ["/etc"],
               "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
        hooks={"prestart": [hook("prestart")], "createRuntime": [hook("createRuntime")],
               "poststart": [hook("poststart")], "poststop": [hook("poststop")]})
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "s1")
    assert waiter.wait_created()["rc"] == 0
    created = json.loads((hooks_out / "createRuntime").read_text())
    assert created["id"] == "s1" and created["bundle"] == str(bundle)
    assert (hooks_out / "prestart").exists() and not (hooks_out / "poststart").exists()
    # delete runs the poststop hooks create was given, not the bundle's of then.
    changed = json.loads((bundle / "config.json").read_text())
    changed["hooks"]["poststop"].append(hook("poststop-added"))
    (bundle / "config.json").write_text(json.dumps(changed))
    assert oci("start", "s1").returncode == 0
    ended = waiter.finish()
    assert ended["status"] == 0, ended
    lines = ended["stdout"].split("\n")
    assert lines[0].split()[3:5] == ["4321", "5432"], lines
    assert lines[1:5] == ["semantics-host", "0", "etc-readonly", "1000"], lines
    assert json.loads((hooks_out / "poststart").read_text())["status"] == "running"
    assert not (hooks_out / "poststop").exists()
    assert oci("delete", "s1").returncode == 0
    poststop = json.loads((hooks_out / "poststop").read_text())
    assert poststop["id"] == "s1" and poststop["status"] == "stopped"
    assert not (hooks_out / "poststop-added").exists()


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(
        oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", ["true"], hooks={
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no-network >&2; exit 3"]}]})
    assert oci("create", "--bundle", str(bundle), "h1").returncode == 1
    message = _last_error(oci.log)["msg"]
    assert "prestart" in message and "no-network" in message, message
    assert not list((tmp_path / "root").iterdir())
    assert not unexpected_leftovers()


def test_a_monitor_killed_during_create_leaves_nothing(oci: Oci, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", LOOP)
    create = subprocess.Popen(oci.argv("create", "--bundle", str(bundle), "m1"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def monitor() -> int:
        try:
            children = Path(f"/proc/{create.pid}/task/{create.pid}/children").read_text()
        except OSError:
            return 0
        return int(children.split()[0]) if children.split() else 0

    _wait_until(lambda: monitor() and qemu_processes(), "the monitor to boot its VM")
    os.kill(monitor(), signal.SIGKILL)
    assert create.wait(60) == 1
    assert "died" in _last_error(oci.log)["msg"]
    assert not (tmp_path / "root" / "m1").exists()
    assert not unexpected_leftovers()
