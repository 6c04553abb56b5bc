"""The shared filesystem against a hostile container or guest.

What the guest writes crosses into the host through QEMU's 9p server, which
runs as root. These tests try to turn that into host privileges: setuid-root
programs, device nodes and file capabilities for host users, reads of the
rootfs and volumes by other host users, writes to the export's own
directories, to read-only rootfs and volumes, and filling the host's /run.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.functional.containerd_peer import PrivateContainerd
from tests.hostile.conftest import (
    GUEST_EXPORT,
    as_nobody,
    privileged_spec,
    run_spec,
    share_of,
    wait_for_text,
)


def _bind(source: Path, destination: str, mode: str = "rw") -> tuple[str, str]:
    return ("--mount", f"type=bind,src={source},dst={destination},options=rbind:{mode}")


def test_setuid_root_programs_devices_and_capabilities_never_reach_the_host(
    containerd: PrivateContainerd, hostile_tools: Path, world_dir: Path,
) -> None:
    """A plain container copies a program into a volume and into its rootfs and
    makes it setuid root, makes a block device node and gives a file a
    capability: each fails in the guest, and on the host the user nobody runs
    the volume's copy with its own uid (the attack the issue reproduced gave
    euid=0)."""
    (world_dir / "hostile").write_bytes((hostile_tools / "hostile").read_bytes())
    os.chmod(world_dir / "hostile", 0o755)
    script = (
        "exec >/vol/log 2>&1;"
        "cp /vol/hostile /vol/suid; chmod 4755 /vol/suid; echo volume=$?;"
        "cp /vol/hostile /suid; chmod 4755 /suid; echo rootfs=$?;"
        "cp /vol/hostile /vol/sgid; chmod 2755 /vol/sgid; echo setgid=$?;"
        "mknod /vol/disk b 8 0; echo mknod=$?;"
        "/vol/hostile fcap /vol/suid;"
        "echo done; sleep 600"
    )
    started = containerd.ctr("run", "-d", "--runtime", "io.containerd.pykata.v2",
                             *_bind(world_dir, "/vol"), "docker.io/pykata/busybox:test",
                             "setid", "sh", "-c", script)
    assert started.returncode == 0, started.err
    try:
        rootfs = share_of("setid") / "rootfs"
        log = wait_for_text(world_dir / "log", "done")
        assert "volume=1" in log and "rootfs=1" in log and "setgid=1" in log, log
        assert "mknod=1" in log, log
        for path in (world_dir / "suid", world_dir / "sgid", rootfs / "suid"):
            mode = os.stat(path).st_mode
            assert not mode & (stat.S_ISUID | stat.S_ISGID), (path, oct(mode))
        assert not (world_dir / "disk").exists()
        try:
            os.getxattr(world_dir / "suid", "security.capability")
            raise AssertionError("the volume's file got a file capability")
        except OSError as exc:
            assert exc.errno == errno.ENODATA
        ran = as_nobody(str(world_dir / "suid"), "euid")
        assert ran.stdout.strip() == "euid=65534", (ran.stdout, ran.stderr)
        # The container's rootfs and state are the owner's alone on the host.
        refused = as_nobody(str(rootfs / "suid"), "euid")
        assert refused.returncode != 0 and "euid=0" not in refused.stdout
        assert "Permission denied" in refused.stderr
        assert "Permission denied" in as_nobody("ls", str(share_of("setid").parents[3])).stderr
    finally:
        containerd.remove("setid")


def test_the_export_is_read_only_to_root_in_the_guest(
    containerd: PrivateContainerd, tmp_path: Path,
) -> None:
    """Root in the guest (a privileged container in the guest's PID namespace)
    reaches the 9p export the agent mounted, and can create, rename or replace
    nothing in it: not at its root, not in containers/, not in a container's
    directory, where the host mounts."""
    script = (
        f"cd {GUEST_EXPORT} && ls containers >/dev/null && echo reached;"
        "mkdir x 2>/dev/null; echo mkdir=$?;"
        "touch containers/y 2>/dev/null; echo touch=$?;"
        "ln -s /etc containers/evil 2>/dev/null; echo symlink=$?;"
        "mv containers/exporter containers/moved 2>/dev/null; echo rename=$?;"
        "mkdir containers/exporter/new 2>/dev/null; echo mkdir-in=$?;"
        "echo x > containers/exporter/rootfs/written; echo rootfs=$?"
    )
    result = run_spec(containerd, tmp_path, "exporter", privileged_spec(["sh", "-c", script]))
    assert result.returncode == 0, result.err
    out = result.out
    assert "reached" in out, out
    for step in ("mkdir", "touch", "symlink", "rename", "mkdir-in"):
        assert f"{step}=1" in out, (step, out)
    # Its own rootfs is the built-in image, read-only (root.readonly) on the host too.
    assert "rootfs=1" in out, out


def test_read_only_rootfs_and_volume_hold_against_root_in_the_guest(
    containerd: PrivateContainerd, tmp_path: Path, world_dir: Path,
) -> None:
    """A container with root.readonly (`ctr run --read-only`) and a read-only
    volume: the privileged container of the same pod writes through the 9p
    export into both, and the host refuses (CVE-2020-28914's class)."""
    pod = {"io.kubernetes.cri.container-type": "sandbox",
           "io.kubernetes.cri.sandbox-id": "ro-pod"}
    member = {"io.kubernetes.cri.container-type": "container",
              "io.kubernetes.cri.sandbox-id": "ro-pod"}
    (world_dir / "secret").write_text("keep\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    writer = (
        "exec >/home/writer 2>&1;"
        f"until [ -d {GUEST_EXPORT}/containers/ro-victim/rootfs/bin ]; do sleep 0.2; done;"
        f"echo x > {GUEST_EXPORT}/containers/ro-victim/rootfs/evil; echo rootfs=$?;"
        # The victim's read-only volume is the pod's mount of world_dir.
        f"until ls {GUEST_EXPORT}/volumes/*/secret; do sleep 0.2; done;"
        f"for f in {GUEST_EXPORT}/volumes/*/secret; do echo x > $f; echo volume=$?; done;"
        "sleep 600"
    )
    log_mount = {"destination": "/home", "type": "bind", "source": str(logs),
                 "options": ["rbind", "rw"]}
    started = run_spec(containerd, tmp_path, "ro-writer",
                       privileged_spec(["sh", "-c", writer], annotations=pod,
                                       mounts=[log_mount]), detach=True)
    assert started.returncode == 0, started.err
    try:
        victim = containerd.ctr(
            "run", "-d", "--read-only", "--runtime", "io.containerd.pykata.v2",
            *_bind(world_dir, "/home", "ro"), *_bind(logs, "/root"),
            *[a for k, v in member.items() for a in ("--annotation", f"{k}={v}")],
            "docker.io/pykata/busybox:test", "ro-victim", "sh", "-c",
            "touch /inside 2>/dev/null; echo inside=$? > /root/victim; sleep 600")
        assert victim.returncode == 0, victim.err
        log = wait_for_text(logs / "writer", "volume=")
        assert "rootfs=1" in log and "volume=1" in log, log
        assert "inside=1" in wait_for_text(logs / "victim", "inside=")
        assert not (share_of("ro-victim") / "rootfs" / "evil").exists()
        assert (world_dir / "secret").read_text() == "keep\n"
    finally:
        containerd.remove("ro-victim")
        containerd.remove("ro-writer")


def test_a_container_cannot_fill_the_hosts_run(cli: object, tmp_path: Path) -> None:
    """`pykata run`'s writable layer is on the sandbox's bounded tmpfs: a `dd`
    of 64 MiB with scratch_size = 24 fails with ENOSPC in the container, the
    host's /run keeps its space, and pykata says which setting to raise."""
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\nscratch_size = 24\n")
    before = os.statvfs("/run")
    proc = subprocess.run(
        [sys.executable, "-m", "pykata.cli.main", "--config", str(config), "run", "--", "sh",
         "-c", "dd if=/dev/zero of=/big bs=1M count=64 2>&1; echo dd=$?"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "No space left on device" in proc.stdout and "dd=1" in proc.stdout, proc.stdout
    assert "scratch_size" in proc.stderr and "24 MiB" in proc.stderr, proc.stderr
    after = os.statvfs("/run")
    # Nothing stays: the tmpfs went with the sandbox.
    assert abs(after.f_bfree - before.f_bfree) * after.f_frsize < 8 << 20
