"""Symlink swaps in the export while the host creates and deletes a container
(the CVE-2020-2024/2026 class): the host must never mount on, create in, or
remove from a host path the guest chose."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pykata.host.mounts import mounts_under
from tests.functional.containerd_peer import PrivateContainerd
from tests.hostile.conftest import GUEST_EXPORT, privileged_spec, run_spec, wait_for_text

POD = {"io.kubernetes.cri.container-type": "sandbox",
       "io.kubernetes.cri.sandbox-id": "race-pod"}
MEMBER = {"io.kubernetes.cri.container-type": "container",
          "io.kubernetes.cri.sandbox-id": "race-pod"}


def test_symlink_swaps_during_create_and_delete_reach_no_host_path(
    containerd: PrivateContainerd, tmp_path: Path,
) -> None:
    """Root in the guest swaps the directory where the host is about to mount
    the next container's rootfs (and its volumes, and later its deletion)
    for a symlink to a host directory, in a tight loop. Not one swap lands,
    the decoy is untouched and unmounted, and the container runs and is
    deleted as if nothing happened.

    Each run takes a new id: re-creating an id the guest still has in its
    dentry cache while guest root keeps looking it up can make that creation
    fail in the guest (see the README's limitations); that harms only the
    pod whose root does it, and is not what this test is about."""
    decoy = Path(tempfile.mkdtemp(prefix="pykata-decoy-", dir="/tmp"))
    (decoy / "keep").write_text("keep\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    swapper = (
        "exec >/home/swapper 2>&1; n=0; swapped=0; "
        f"cd {GUEST_EXPORT}/containers || exit 9; echo looping; "
        "while [ ! -e /home/stop ]; do "
        "  for v in race-victim-0 race-victim-1; do "
        "  for d in $v $v/rootfs $v/volumes/0; do "
        "    mv $d $d.gone 2>/dev/null; rmdir $d 2>/dev/null; "
        f"    ln -sT {decoy} $d 2>/dev/null && swapped=$((swapped+1)); "
        "  done; done; n=$((n+1)); "
        "done; echo tries=$n swapped=$swapped"
    )
    home = {"destination": "/home", "type": "bind", "source": str(logs),
            "options": ["rbind", "rw"]}
    started = run_spec(containerd, tmp_path, "race-swapper",
                       privileged_spec(["sh", "-c", swapper], annotations=POD, mounts=[home]),
                       detach=True)
    assert started.returncode == 0, started.err
    try:
        wait_for_text(logs / "swapper", "looping")
        annotations = [a for k, v in MEMBER.items() for a in ("--annotation", f"{k}={v}")]
        for attempt in range(2):
            victim = containerd.ctr(
                "run", "--rm", "--runtime", "io.containerd.pykata.v2", *annotations,
                "--mount", f"type=bind,src={volume},dst=/home,options=rbind:rw",
                "docker.io/pykata/busybox:test", f"race-victim-{attempt}", "sh", "-c",
                "echo ran > /home/ran; cat /home/ran")
            assert victim.returncode == 0, (attempt, victim.err)
            assert victim.out == "ran\n"
        (logs / "stop").write_text("")
        result = wait_for_text(logs / "swapper", "tries=")
        assert "swapped=0" in result, result
        assert int(result.split("tries=")[1].split()[0]) > 0, result
        assert sorted(p.name for p in decoy.iterdir()) == ["keep"]
        assert (decoy / "keep").read_text() == "keep\n"
        assert not mounts_under(decoy)
    finally:
        containerd.remove("race-swapper")
        if not mounts_under(decoy):  # never rmtree through a mount
            shutil.rmtree(decoy)
