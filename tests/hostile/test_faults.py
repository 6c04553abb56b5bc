"""SIGKILL of QEMU, of the shim (the pod's owner, QEMU's parent), of the shim
of a pod whose VM came from the VM cache (QEMU is the cache's child, not the
shim's) and of the agent in the guest, in each phase of a task's life: the
exit reaches containerd, delete succeeds, nothing leaks.

The victim is a member of a pod whose sandbox container is privileged and
shares the guest's PID namespace (it is what kills the agent). Phases:
booting (the pod's first Create, VM not yet answering), created (Tasks.Create
without Start, as CRI leaves it), running, exec running, deleting. The agent
cannot be killed while the VM boots: nothing runs in the guest but it then;
a VM from the cache does not boot for its pod.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pykata.errors import PykataError
from pykata.runtime.keys import pod_key
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import qemu_running, read_sandbox_state
from tests.functional.cache_peer import running_cache, warm_sandboxes
from tests.functional.conftest import qemu_processes, shim_processes, unexpected_leftovers
from tests.functional.containerd_peer import IMAGE, NAMESPACE, RUNTIME, PrivateContainerd
from tests.functional.containerd_tasks import create_task, snapshot_mounts
from tests.hostile.conftest import privileged_spec, run_spec

POD = "fault-pod"
SANDBOX = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": POD}
MEMBER = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": POD}
VICTIM = "fault-victim"
HELPER = "fault-helper"

CASES = [(killer, phase) for killer in ("qemu", "shim", "agent", "cached-shim")
         for phase in ("booting", "created", "running", "exec", "deleting")
         if not (killer in ("agent", "cached-shim") and phase == "booting")]


def _annotations(values: dict[str, str]) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--annotation", f"{k}={v}")]


def _wait(condition: Callable[[], object], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Pod:
    def __init__(self, containerd: PrivateContainerd, tmp_path: Path) -> None:
        self.containerd = containerd
        self.tmp_path = tmp_path
        self.key = pod_key(str(containerd.socket), NAMESPACE, POD)

    def qemu_pid(self) -> int | None:
        """The pod's QEMU: by its name while it boots, else by its sandbox's
        record (a VM from the cache keeps its warm name)."""
        for line in qemu_processes():
            if f"-name pykata-{self.key} " in line:
                return int(line.split()[0])
        try:
            state = read_sandbox_state(SandboxPaths.for_key(self.key))
        except PykataError:
            return None
        return state.qemu_pid if qemu_running(state) else None

    def shim_pid(self) -> int | None:
        for line in shim_processes():
            if f"{self.key}.sock" in line:
                return int(line.split()[0])
        return None

    def start_helper(self) -> None:
        spec = privileged_spec(["sleep", "600"], annotations=SANDBOX)
        # containerd forgets the previous case's task of the same id (its shim
        # killed) only once its own clean-up of that shim has run, some time
        # after the container was removed.
        deadline = time.monotonic() + 60
        while True:
            started = run_spec(self.containerd, self.tmp_path, HELPER, spec, detach=True)
            if "already exists" not in started.err or time.monotonic() > deadline:
                break
            self.containerd.remove(HELPER)
            time.sleep(1)
        assert started.returncode == 0, started.err

    def kill(self, killer: str) -> None:
        if killer == "agent":
            # The exec dies with the VM; its own outcome does not matter.
            subprocess.run(self.containerd.ctr_argv(
                "task", "exec", "--exec-id", f"kill-{time.monotonic_ns()}", HELPER,
                "sh", "-c", "kill -9 $(pidof python3)"), capture_output=True, timeout=60)
            return
        pid = {"qemu": self.qemu_pid, "shim": self.shim_pid,
               "cached-shim": self.shim_pid}[killer]()
        assert pid is not None, f"no {killer} process for the pod"
        os.kill(pid, signal.SIGKILL)

    def gone(self, container_id: str) -> bool:
        return self.containerd.task_status(container_id) in ("STOPPED", "")

    def clean(self) -> None:
        for container_id in (VICTIM, HELPER):
            self.containerd.remove(container_id)
        _wait(lambda: not _leftovers(), "pykata to clean up after the fault: "
              + "; ".join(_leftovers()))


def _leftovers() -> list[str]:
    """What the pod left; the warm VMs still in the VM cache, and its
    endpoint's record, are the cache's (a VM it handed out keeps its warm
    name, but not its directory)."""
    pooled = [*warm_sandboxes(), f"{run_root()}/factory"]
    return [line for line in unexpected_leftovers()
            if not any(name in line for name in pooled)]


@pytest.mark.parametrize(("killer", "phase"), CASES)
def test_sigkill_in_every_phase(containerd: PrivateContainerd, tmp_path: Path,
                                shim_config: Callable[[str], None],
                                killer: str, phase: str) -> None:
    """Kill it, then: the task's exit reached containerd (TaskExit, or the task
    gone with its shim), `ctr task delete` and `ctr container rm` succeed,
    and no QEMU, shim, mount or state directory remains."""
    if killer != "cached-shim":
        _sigkill(containerd, tmp_path, killer, phase)
        return
    with running_cache(tmp_path / "cache", count=1, template=False) as cache:
        shim_config(cache.config_file.read_text())
        _sigkill(containerd, tmp_path, killer, phase)
        assert cache.status()["handed_out"] == 1  # the pod did take the cached VM


def _sigkill(containerd: PrivateContainerd, tmp_path: Path, killer: str, phase: str) -> None:
    pod = Pod(containerd, tmp_path)
    with containerd.events() as events:
        try:
            if phase == "booting":
                _booting(pod, killer)
                return
            pod.start_helper()
            target = VICTIM
            if phase == "created":
                created = containerd.ctr("container", "create", "--runtime", RUNTIME,
                                         *_annotations(MEMBER), IMAGE, VICTIM, "sleep", "600")
                assert created.returncode == 0, created.err
                create_task(containerd.socket, NAMESPACE, VICTIM,
                            snapshot_mounts(containerd.ctr_argv(), VICTIM))
                assert containerd.task_status(VICTIM) == "CREATED"
                pod.kill(killer)
            else:
                started = containerd.ctr("run", "-d", "--runtime", RUNTIME,
                                         *_annotations(MEMBER), IMAGE, VICTIM, "sleep", "600")
                assert started.returncode == 0, started.err
                if phase == "running":
                    pod.kill(killer)
                elif phase == "exec":
                    _exec_running(pod, killer, events)
                else:
                    _deleting(pod, killer)
                    target = ""
            if target:
                _wait(lambda: pod.gone(target), f"{target} to stop")
                if "shim" not in killer:  # containerd itself ends a dead shim's tasks
                    assert "137" in events.wait_for("/tasks/exit", target)
                if containerd.task_status(target) == "STOPPED":
                    deleted = containerd.ctr("task", "delete", target)
                    assert deleted.returncode == 0, deleted.err
        finally:
            pod.clean()
    for container_id in (VICTIM, HELPER):
        assert containerd.ctr("container", "info", container_id).returncode != 0


def _booting(pod: Pod, killer: str) -> None:
    """Kill while the pod's first Create waits for its VM's agent."""
    proc = subprocess.Popen(
        pod.containerd.ctr_argv("run", "-d", "--runtime", RUNTIME, *_annotations(SANDBOX),
                                IMAGE, HELPER, "sleep", "600"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(lambda: pod.qemu_pid() is not None or proc.poll() is not None, "the VM")
        assert proc.poll() is None, "the create finished before the VM could be killed"
        pod.kill(killer)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, "a create whose VM was killed succeeded"
        assert err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert pod.containerd.task_status(HELPER) == ""


def _exec_running(pod: Pod, killer: str, events: object) -> None:
    proc = subprocess.Popen(
        pod.containerd.ctr_argv("task", "exec", "--exec-id", "long", VICTIM, "sleep", "600"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        events.wait_for("/tasks/exec-started", VICTIM)  # type: ignore[attr-defined]
        pod.kill(killer)
        proc.communicate(timeout=120)
        assert proc.returncode != 0, "the exec outlived its VM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _deleting(pod: Pod, killer: str) -> None:
    """Stop the victim, then kill while its Delete runs; a second delete (or
    the dead shim's cleanup) finishes the job."""
    containerd = pod.containerd
    assert containerd.ctr("task", "kill", "-s", "KILL", VICTIM).returncode == 0
    _wait(lambda: containerd.task_status(VICTIM) == "STOPPED", "the victim to stop")
    proc = subprocess.Popen(containerd.ctr_argv("task", "delete", VICTIM),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    time.sleep(0.05)
    pod.kill(killer)
    proc.communicate(timeout=120)
    if containerd.task_status(VICTIM) != "":
        again = containerd.ctr("task", "delete", VICTIM)
        assert again.returncode == 0 or containerd.task_status(VICTIM) == "", again.err
    assert containerd.task_status(VICTIM) == ""
