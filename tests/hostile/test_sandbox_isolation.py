"""One sandbox never destroys another: state keyed per pod, removed only by its owner."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pykata.runtime.paths import run_root
from tests.functional.containerd_peer import IMAGE, RUNTIME, CtrResult, PrivateContainerd

OTHER_NAMESPACE = "pykata-other"


def _ctr_in(containerd: PrivateContainerd, namespace: str, *args: str) -> CtrResult:
    proc = subprocess.run(["ctr", "--address", str(containerd.socket), "-n", namespace, *args],
                          capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    return CtrResult(proc.returncode, proc.stdout, proc.stderr)


def _exec_works(containerd: PrivateContainerd, container_id: str, exec_id: str) -> bool:
    result = containerd.ctr("task", "exec", "--exec-id", exec_id, container_id, "echo", "alive")
    return result.returncode == 0 and result.out == "alive\n"


def test_the_same_task_id_in_another_namespace_leaves_the_first_pod_alone(
    containerd: PrivateContainerd, tmp_path: Path,
) -> None:
    """A pod `twin` runs in one namespace. In another namespace a task with the
    same id fails to be created (crun refuses a file bound over /etc), then
    another one runs: the first pod keeps running and answering throughout."""
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "twin", "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        imported = _ctr_in(containerd, OTHER_NAMESPACE, "image", "import",
                           str(containerd.base / "busybox-oci.tar"))
        assert imported.returncode == 0, imported.err
        host_file = tmp_path / "file"
        host_file.write_text("x\n")
        refused = _ctr_in(containerd, OTHER_NAMESPACE, "run", "--rm", "--runtime", RUNTIME,
                          "--mount", f"type=bind,src={host_file},dst=/etc,options=rbind",
                          IMAGE, "twin", "true")
        assert refused.returncode != 0
        assert "Not a directory" in refused.err, refused.err
        assert _exec_works(containerd, "twin", "after-refused")
        other = _ctr_in(containerd, OTHER_NAMESPACE, "run", "--rm", "--runtime", RUNTIME,
                        IMAGE, "twin", "echo", "the other twin")
        assert other.returncode == 0, other.err
        assert other.out == "the other twin\n"
        assert _exec_works(containerd, "twin", "after-other")
    finally:
        containerd.remove("twin")
        _ctr_in(containerd, OTHER_NAMESPACE, "image", "rm", IMAGE)


def test_ids_named_like_pykata_directories_touch_no_other_pod(
    containerd: PrivateContainerd,
) -> None:
    """Tasks named shims, sandboxes and shared come and go while another pod
    runs: its shim socket and state stay, and it keeps answering."""
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "keeper", "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        before = sorted(p.name for p in (run_root() / "shims").iterdir())
        for name in ("shims", "sandboxes", "shared"):
            result = containerd.run(name, "echo", name)
            assert result.returncode == 0, result.err
            assert result.out == f"{name}\n"
        assert sorted(p.name for p in (run_root() / "shims").iterdir()) == before
        assert _exec_works(containerd, "keeper", "still-here")
    finally:
        containerd.remove("keeper")
