"""A pod on the host's cgroups (`[runtime] sandbox_cgroup_only`), on real VMs.

The pod's owner and its QEMU run in the cgroup its spec names, held to the
pod's limits plus the configured overhead; `update` changes them on the
host; teardown (or cleanup after a killed owner) removes what pykata made
and nothing else. This machine's hierarchies are cgroup v1; v2 and hybrid
hosts are made in a private mount namespace (a v2 hierarchy here has no cpu
or memory controller: the v1 ones hold them, so on v2 only placement, the
refusal of limits that cannot hold, and removal are tried).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import assets
from pykata.host.cgroups import Hierarchy, host_layout
from pykata.runtime.pod_cgroup import MIB
from tests.cri.cri_peer import cgroup_mount_script
from tests.functional.oci_tools import Oci, make_bundle

BUSY = ["sh", "-c", "while :; do :; done"]
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]
OVERHEAD_MIB = 256
OVERHEAD_MILLICPUS = 50


@pytest.fixture
def oci(tmp_path: Path, guest_assets: assets.AssetPaths) -> Oci:
    return Oci(tmp_path / "root", log=tmp_path / "oci-log.json")


@pytest.fixture
def top() -> Iterator[str]:
    """A cgroup name of the test's own, at the top of every hierarchy; made
    by pykata (and removed by it), or by nobody."""
    name = f"pykata-cgtest-{secrets.token_hex(4)}"
    yield name
    leftover = [h.mount / name for h in host_layout().hierarchies if (h.mount / name).exists()]
    for path in sorted((p for d in leftover for p in d.rglob("*") if p.is_dir()),
                       key=lambda p: len(p.parts), reverse=True):
        path.rmdir()
    for path in leftover:
        path.rmdir()
    assert not leftover, f"cgroups left behind: {leftover}"


def _bundle(where: Path, args: list[str], cgroups_path: str, **resources: object) -> Path:
    bundle = make_bundle(where, args)
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["cgroupsPath"] = cgroups_path
    if resources:
        spec["linux"]["resources"] = resources
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _dirs(path: str) -> dict[Hierarchy, Path]:
    return {h: h.mount / path.lstrip("/") for h in host_layout().hierarchies}


def _procs(directory: Path) -> set[int]:
    return {int(p) for p in (directory / "cgroup.procs").read_text().split()}


def _qemu_of(oci: Oci, cid: str) -> int:
    key = json.loads((oci.root / cid / "state.json").read_text())["sandbox_key"]
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*-name pykata-{key} "],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(oci: Oci, bundle: Path, cid: str, *flags: str) -> int:
    """create, then start (create leaves the container's stdio to it)."""
    code = oci(*flags, "create", "--bundle", str(bundle), cid, timeout=300).returncode
    if code == 0:
        code = oci(*flags, "start", cid).returncode
    return code


def _rmdir_eventually(directory: Path) -> None:
    """A v1 cgroup whose last child was just removed can stay busy a moment."""
    deadline = time.monotonic() + 5
    while True:
        try:
            directory.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _hierarchy(dirs: dict[Hierarchy, Path], controller: str) -> Path:
    return next(d for h, d in dirs.items() if h.has(controller))


def test_an_oci_pod_runs_in_its_cgroup_held_to_its_limits(oci: Oci, tmp_path: Path,
                                                           top: str) -> None:
    """A busy container limited to 0.2 CPU and 256 MiB: its monitor and QEMU
    are in its cgroup in every hierarchy, QEMU stays under about a quarter
    of a core, `update` changes the host's limits, and `delete` removes the
    cgroup and the parent pykata made for it."""
    path = f"/{top}/c1"
    bundle = _bundle(tmp_path / "b", BUSY, path, cpu={"quota": 20_000, "period": 100_000},
                     memory={"limit": 256 * MIB})
    assert _run(oci, bundle, "c1") == 0, (tmp_path / "oci-log.json").read_text()
    try:
        monitor = oci.state("c1")["pid"]
        qemu = _qemu_of(oci, "c1")
        dirs = _dirs(path)
        for h, directory in dirs.items():
            assert {monitor, qemu} <= _procs(directory), (h, _procs(directory))
        cpu, memory = _hierarchy(dirs, "cpu"), _hierarchy(dirs, "memory")
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 20_000 + OVERHEAD_MILLICPUS * 100
        assert int((memory / "memory.limit_in_bytes").read_text()) == (256 + OVERHEAD_MIB) * MIB
        # Measured over seconds: under TCG the busy guest would take a whole
        # core without the limit.
        t0, c0 = time.monotonic(), _cpu_seconds(qemu)
        time.sleep(8)
        share = (_cpu_seconds(qemu) - c0) / (time.monotonic() - t0)
        assert 0.1 < share < 0.3, f"QEMU used {share:.2f} of a core"

        result = oci("update", "--memory", str(300 * MIB), "--cpu-quota", "50000",
                     "--cpu-period", "100000", "c1")
        assert result.returncode == 0, result.err
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000 + OVERHEAD_MILLICPUS * 100
        assert int((memory / "memory.limit_in_bytes").read_text()) == (300 + OVERHEAD_MIB) * MIB
    finally:
        result = oci("delete", "--force", "c1")
    assert result.returncode == 0, result.err
    left = [d for h in host_layout().hierarchies for d in (h.mount / top,) if d.exists()]
    assert not left, left


def test_a_memory_limit_too_small_for_the_vm_is_refused_and_nothing_is_left(
        oci: Oci, tmp_path: Path, top: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\nsandbox_overhead_memory_mib = 0\n")
    monkeypatch.setenv("PYKATA_CONFIG", str(config))
    bundle = _bundle(tmp_path / "b", IDLE, f"/{top}/c2", memory={"limit": 64 * MIB})
    assert _run(oci, bundle, "c2") != 0
    log = (tmp_path / "oci-log.json").read_text()
    assert "too small for its VM" in log and "needs at least" in log, log
    assert "sandbox_overhead_memory_mib" in log, log
    assert not any((h.mount / top).exists() for h in host_layout().hierarchies)
    assert oci("list").out.count("c2") == 0


def test_a_vm_the_hosts_limit_kills_is_reported_so(
        tmp_path: Path, top: str, guest_assets: assets.AssetPaths) -> None:
    """Without overhead, a container within its own 240 MiB limit still
    takes the VM past the host's 240 MiB: the host kills QEMU, and pykata
    says it was the pod's limit, naming what to raise."""
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\nsandbox_overhead_memory_mib = 0\n")
    fill = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=150 && echo filled; sleep 30"
    bundle = _bundle(tmp_path / "b", ["sh", "-c", fill], f"/{top}/c5",
                     memory={"limit": 240 * MIB})
    spec = json.loads((bundle / "config.json").read_text())
    for mount in spec["mounts"]:
        if mount["destination"] == "/dev/shm":
            mount["options"] = [o for o in mount["options"] if not o.startswith("size=")]
            mount["options"].append("size=200m")
    (bundle / "config.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, "-m", "pykata.cli.main", "run", "--bundle", str(bundle)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYKATA_CONFIG": str(config)})
    assert result.returncode == 137, result.stdout + result.stderr
    assert "filled" not in result.stdout, result.stdout
    assert f"the host's memory limit for the pod (240 MiB in cgroup /{top}/c5) killed" in (
        result.stderr), result.stderr
    assert "sandbox_overhead_memory_mib" in result.stderr, result.stderr
    assert not any((h.mount / top).exists() for h in host_layout().hierarchies)


def test_a_killed_owner_leaves_no_cgroup_after_delete(oci: Oci, tmp_path: Path,
                                                      top: str) -> None:
    path = f"/{top}/c3"
    bundle = _bundle(tmp_path / "b", IDLE, path)
    assert _run(oci, bundle, "c3") == 0, (tmp_path / "oci-log.json").read_text()
    qemu = _qemu_of(oci, "c3")
    os.kill(oci.state("c3")["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # QEMU ends with its owner
    assert any(d.exists() for d in _dirs(path).values())  # the record still names it
    result = oci("delete", "--force", "c3")
    assert result.returncode == 0, result.err
    assert not any((h.mount / top).exists() for h in host_layout().hierarchies)


def test_a_killed_pykata_run_leaves_no_cgroup_after_cleanup(
        tmp_path: Path, top: str, guest_assets: assets.AssetPaths) -> None:
    """`pykata run` SIGKILLed: its QEMU dies with it, its cgroups stay (nobody
    was left to remove them) until `pykata cleanup`, which removes them."""
    path = f"/{top}/c6"
    bundle = _bundle(tmp_path / "b", ["sh", "-c", "echo up; sleep 600"], path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--bundle", str(bundle)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    qemu = {p for d in _dirs(path).values() for p in _procs(d)} - {proc.pid}
    assert qemu, "no QEMU in the pod's cgroup"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in qemu) and time.monotonic() < deadline:
        time.sleep(0.1)  # QEMU ends with its owner
    assert all(d.exists() for d in _dirs(path).values())
    result = subprocess.run([sys.executable, "-m", "pykata.cli.main", "cleanup"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not any((h.mount / top).exists() for h in host_layout().hierarchies), result.stdout


def test_an_exec_relay_runs_in_the_pods_cgroup(oci: Oci, tmp_path: Path, top: str) -> None:
    """`pykata-oci exec` stays on the host for the exec'd process's life: it
    is the pod's, and counted with it."""
    path = f"/{top}/c7"
    assert _run(oci, _bundle(tmp_path / "b", IDLE, path), "c7") == 0, (
        tmp_path / "oci-log.json").read_text()
    try:
        pid_file = tmp_path / "exec.pid"
        relay = subprocess.Popen(oci.argv("exec", "--pid-file", str(pid_file), "c7",
                                          "sleep", "20"),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            pid = int(pid_file.read_text())
            assert pid == relay.pid
            for h, directory in _dirs(path).items():
                assert pid in _procs(directory), h
        finally:
            relay.kill()
            relay.wait()
    finally:
        result = oci("delete", "--force", "c7")
    assert result.returncode == 0, result.err


def test_systemd_paths_and_a_parent_pykata_did_not_make(oci: Oci, tmp_path: Path) -> None:
    """`--systemd-cgroup` with slice:prefix:name: the scope goes where systemd
    would put it; the slice that already existed stays after delete."""
    word = f"pykatacg{secrets.token_hex(3)}"
    made = [h.mount / f"{word}.slice" for h in host_layout().hierarchies]
    for directory in made:
        directory.mkdir()
        if (directory / "cpuset.cpus").exists():
            for name in ("cpuset.cpus", "cpuset.mems"):
                (directory / name).write_text((directory.parent / name).read_text())
    try:
        bundle = _bundle(tmp_path / "b", IDLE, f"{word}-pod1.slice:pykata:c4")
        assert _run(oci, bundle, "c4", "--systemd-cgroup") == 0, (
            tmp_path / "oci-log.json").read_text()
        try:
            scope = f"{word}.slice/{word}-pod1.slice/pykata-c4.scope"
            qemu = _qemu_of(oci, "c4")
            for h, directory in _dirs(scope).items():
                assert qemu in _procs(directory), h
        finally:
            result = oci("delete", "--force", "c4")
        assert result.returncode == 0, result.err
        for directory in made:
            assert directory.is_dir()
            assert not [p for p in directory.iterdir() if p.is_dir()], directory
    finally:
        for directory in made:
            _rmdir_eventually(directory)


# --- cgroup v2 and hybrid hosts, in a private mount namespace ---------------------------

_IN_NAMESPACE = r"""
set -eu
{mounts}
{run} &
run=$!
dir=/sys/fs/cgroup/{path}
unified={unified}
for i in $(seq 600); do
    # (cgroup files have no size: test -s would never be true)
    if grep -qs . "$dir/cgroup.procs" && grep -q qemu-system $(sed 's|.*|/proc/&/comm|' \
            "$dir/cgroup.procs") 2>/dev/null; then break; fi
    if ! kill -0 $run 2>/dev/null; then echo "run ended early"; wait $run; exit 1; fi
    sleep 0.1
done
echo "placed: $(for p in $(cat $dir/cgroup.procs); do cat /proc/$p/comm; done | sort | tr '\n' ' ')"
if [ -n "$unified" ]; then
    echo "unified: $(for p in $(cat $unified/cgroup.procs); do cat /proc/$p/comm; done \
        | sort | tr '\n' ' ')"
fi
echo "controllers: $(cat $dir/cgroup.controllers 2>/dev/null || true)"
kill -TERM $run
wait $run || true
[ -e "$dir" ] && echo "left: $dir" || echo "removed"
"""


def _v2_mounts() -> str:
    return "umount -R /sys/fs/cgroup\nmount -t cgroup2 none /sys/fs/cgroup"


def _hybrid_mounts() -> str:
    """The host's v1 hierarchies again, and a v2 one at unified/ (as this
    machine has already; added when the host lacks it)."""
    lines = cgroup_mount_script()
    if not any(" -t cgroup2 " in line for line in lines):
        lines += ["mkdir -p /sys/fs/cgroup/unified",
                  "mount -t cgroup2 none /sys/fs/cgroup/unified"]
    return "\n".join(["umount -R /sys/fs/cgroup", *lines])


def _in_namespace(mounts: str, bundle: Path, path: str, unified: str = "") -> str:
    run = " ".join([sys.executable, "-m", "pykata.cli.main", "run", "--bundle", str(bundle)])
    script = _IN_NAMESPACE.format(mounts=mounts, run=run, path=path.lstrip("/"),
                                  unified=unified)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_on_a_cgroup_v2_host_the_pod_is_placed_and_removed(
        tmp_path: Path, guest_assets: assets.AssetPaths) -> None:
    path = f"/pykata-cgtest-{secrets.token_hex(4)}/v2"
    out = _in_namespace(_v2_mounts(), _bundle(tmp_path / "b", IDLE, path), path)
    assert "placed: " in out and "qemu-system-x86" in out and "python" in out, out
    assert "removed" in out, out


def test_on_a_cgroup_v2_host_limits_without_a_controller_are_refused(
        tmp_path: Path, guest_assets: assets.AssetPaths) -> None:
    path = f"/pykata-cgtest-{secrets.token_hex(4)}/v2"
    bundle = _bundle(tmp_path / "b", IDLE, path, memory={"limit": 256 * MIB})
    script = "\n".join([_v2_mounts(), " ".join([
        sys.executable, "-m", "pykata.cli.main", "run", "--bundle", str(bundle)]) + " || true",
        f"[ -e /sys/fs/cgroup{path} ] && echo left || echo clean"])
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    assert "no cgroup hierarchy here has the memory controller" in result.stderr, result.stderr
    assert "sandbox_cgroup_only = false" in result.stderr, result.stderr
    assert result.stdout.strip().endswith("clean"), result.stdout


def test_on_a_hybrid_host_the_pod_joins_the_v2_hierarchy_too(
        tmp_path: Path, guest_assets: assets.AssetPaths) -> None:
    path = f"/pykata-cgtest-{secrets.token_hex(4)}/hybrid"
    out = _in_namespace(_hybrid_mounts(), _bundle(tmp_path / "b", IDLE, path),
                        "cpu" + path, unified=f"/sys/fs/cgroup/unified{path}")
    placed = next(line for line in out.splitlines() if line.startswith("placed: "))
    unified = next(line for line in out.splitlines() if line.startswith("unified: "))
    assert "qemu-system-x86" in placed and "qemu-system-x86" in unified, out
    assert "removed" in out, out
