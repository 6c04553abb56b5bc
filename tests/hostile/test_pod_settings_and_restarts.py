"""Per-pod settings a tenant writes, and a pod id reused at once."""

from __future__ import annotations

from collections.abc import Callable

from pykata import config
from tests.functional.conftest import shim_processes
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd

KERNEL_PARAMS = "io.katacontainers.config.hypervisor.kernel_params"


def test_kernel_params_that_take_over_the_guest_are_refused(
    containerd: PrivateContainerd, shim_config: Callable[[str], None],
) -> None:
    """kernel_params is allowed by the configuration, yet init=, rdinit=,
    panic=0, console= and pykata.* are refused by name before any VM boots."""
    shim_config(config.DEFAULT_CONFIG.read_text().replace(
        "enable_annotations = []", 'enable_annotations = ["kernel_params"]'))
    for value, named in (("init=/bin/sh", "init="), ("rdinit=/bin/sh", "rdinit="),
                         ("panic=0", "panic="), ("console=ttyS1", "console="),
                         ("pykata.transport=vsock", "pykata.transport")):
        result = containerd.run("params", "true",
                                extra=("--annotation", f"{KERNEL_PARAMS}={value}"))
        assert result.returncode != 0
        assert named in result.err, result.err
        assert "not allowed" in result.err or "pykata's own" in result.err, result.err
    allowed = containerd.run("params", "true",
                             extra=("--annotation", f"{KERNEL_PARAMS}=loglevel=4"))
    assert allowed.returncode == 0, allowed.err


def test_a_pod_id_reused_at_once_gets_one_shim_and_works(containerd: PrivateContainerd) -> None:
    """`ctr run --rm` with the same id eight times in a row, then a long-running
    task of that id: each run succeeds, and the long-running one is served by
    exactly one shim, the one its exec reaches (a shim going away used to
    remove its successor's socket)."""
    for i in range(8):
        result = containerd.run("again", "echo", str(i))
        assert result.returncode == 0, result.err
        assert result.out == f"{i}\n"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "again", "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        mine = [line for line in shim_processes() if "-id again " in line]
        assert len(mine) == 1, mine
        exec_result = containerd.ctr("task", "exec", "--exec-id", "e1", "again", "echo", "ok")
        assert exec_result.returncode == 0 and exec_result.out == "ok\n", exec_result.err
    finally:
        containerd.remove("again")
