"""Per-pod settings a tenant writes, and a pod id reused at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.functional.conftest import session_config_text, shim_processes
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd
from tests.hostile.conftest import privileged_spec, run_spec

KERNEL_PARAMS = "io.katacontainers.config.hypervisor.kernel_params"


def test_kernel_params_that_take_over_the_guest_are_refused(
    containerd: PrivateContainerd, shim_config: Callable[[str], None],
) -> None:
    """kernel_params is allowed by the configuration, yet init=, rdinit=,
    panic=0, console=, pykata.*, sysctl.*, environment-shaped words and any
    word off the allowlist are refused by name before any VM boots."""
    shim_config(session_config_text().replace(
        "enable_annotations = []", 'enable_annotations = ["kernel_params"]'))
    for value, named in (("init=/bin/sh", "init="), ("rdinit=/bin/sh", "rdinit="),
                         ("panic=0", "panic="), ("console=ttyS1", "console="),
                         ("pykata.transport=vsock", "pykata.transport"),
                         ("sysctl.kernel.panic=0", "sysctl.kernel.panic="),
                         ("PYKATA_STAGE=2", "PYKATA_STAGE="),
                         ("PYTHONINSPECT=1", "PYTHONINSPECT="),
                         ("single", "parameter single is not one a pod may set")):
        result = containerd.run("params", "true",
                                extra=("--annotation", f"{KERNEL_PARAMS}={value}"))
        assert result.returncode != 0
        assert named in result.err, result.err
        assert any(why in result.err for why in ("not allowed", "pykata's own",
                                                 "not one a pod may set")), result.err
    allowed = containerd.run("params", "true",
                             extra=("--annotation", f"{KERNEL_PARAMS}=loglevel=4"))
    assert allowed.returncode == 0, allowed.err


def test_words_the_kernel_hands_to_init_reach_neither_init_nor_the_agent(
    containerd: PrivateContainerd, shim_config: Callable[[str], None], tmp_path: Path,
) -> None:
    """The operator's own kernel_params (trusted, so not filtered) carry words
    the kernel hands to /init: PYKATA_STAGE=2 (which init took for "stage 1
    done"), PYTHONINSPECT, PYTHONWARNINGS, PYTHONHASHSEED and a bare word.
    /init still runs its first stage (crun's pivot_root needs it: the container
    starts), and neither /init nor the agent has any of them in its
    environment: the agent's is /init's fixed list."""
    words = "PYKATA_STAGE=2 PYTHONINSPECT=1 PYTHONWARNINGS=error PYTHONHASHSEED=7 single"
    shim_config(session_config_text().replace(
        'kernel_params = ""', f'kernel_params = "{words}"'))
    script = ("grep -o PYKATA_STAGE=2 /proc/cmdline; "
              "for pid in 1 $(pidof python3); do echo \"== $pid\"; "
              "tr '\\0' '\\n' < /proc/$pid/environ; done")
    result = run_spec(containerd, tmp_path, "initenv", privileged_spec(["sh", "-c", script]))
    assert result.returncode == 0, result.err
    cmdline, init_part, agent_part = result.out.split("== ")
    assert cmdline == "PYKATA_STAGE=2\n"  # the words did reach the kernel
    init_env = init_part.splitlines()[1:]
    agent_env = dict(line.partition("=")[::2] for line in agent_part.splitlines()[1:])
    assert init_env == [], init_env
    assert sorted(agent_env) == ["PATH", "PYKATA_BOOT_INIT", "PYKATA_BOOT_PYTHON",
                                 "PYTHONDONTWRITEBYTECODE", "PYTHONPATH"], agent_env
    assert agent_env["PYTHONPATH"] == "/usr/lib/pykata"


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
