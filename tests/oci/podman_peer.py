"""Podman 4.3 (with conmon 2.1) driving a runc-compatible runtime, isolated.

Podman has no daemon: isolation is every call's global flags plus
configuration files of this peer's own, under /tmp/pykata-oci-peers-podman-*:
storage (--root, --runroot, --storage-driver), libpod state (--tmpdir), file
locks instead of the machine-wide /dev/shm/libpod_lock, a file events log,
its own CNI config dir, no registries. conmon starts the exit command
(`podman container cleanup`) with conmon_env_vars only, so the same
CONTAINERS_CONF has to reach it through them, or the cleanup would use
shm locks and the machine's configuration.

The runtime keeps its state in its default root: podman does not pass
--runtime-flag on to the exit command, so with `--runtime-flag root=...` the
cleanup's `delete --force` would look in the default root and the state would
stay behind. leftovers() asks the runtime (`list --format json`) for
containers whose bundle is under this peer's directory instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.oci.docker_peer import (
    cgroup_dirs,
    clear_base,
    delete_runtime_containers,
    fs_type,
    keep,
    make_base,
    mounts_under,
    processes_under,
    runtime_containers_under,
    settled,
)

CONMON = "/usr/bin/conmon"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# run/create get --cgroup-parent, so containers and their conmons sit in
# cgroups named after this peer (containers.conf of podman 4.3 has no setting for it)
_CGROUP_VERBS = {("run",), ("create",), ("container", "run"), ("container", "create")}


def missing_tools() -> list[str]:
    wanted = {"podman": "podman", CONMON: "conmon"}
    return sorted({f"{tool} ({pkg})" for tool, pkg in wanted.items() if not shutil.which(tool)})


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


class PodmanPeer:
    def __init__(self, runtime: Path, *, default_ulimits: Sequence[str] = (),
                 runtime_env: Mapping[str, str] | None = None,
                 storage_driver: str | None = None, parent: Path = Path("/tmp")) -> None:
        """default_ulimits go to containers.conf: a host runtime (runc, crun)
        needs limits it may set here, since podman asks for more than this
        machine's hard limits and root has no CAP_SYS_RESOURCE. pykata's runtime
        sets rlimits inside its VM, so it gets podman's defaults (none given)."""
        self.runtime = runtime
        self.base = make_base("podman", runtime, parent)
        self.tag = self.base.name
        self.root = self.base / "root"
        self.runroot = self.base / "runroot"
        self.tmpdir = self.base / "libpod"
        self.storage_driver = storage_driver or ("vfs" if fs_type(self.base) == "overlay"
                                                 else "overlay")
        self.default_ulimits = list(default_ulimits)
        self.runtime_env = dict(runtime_env or {})
        self.image = ""
        self.stopped = False
        self._write_config()

    def _write_config(self) -> None:
        b = self.base
        for d in ("networks", "hooks", "volumes", "events", "tmp"):
            (b / d).mkdir()
        self.files = {
            "CONTAINERS_CONF": b / "containers.conf",
            "CONTAINERS_STORAGE_CONF": b / "storage.conf",
            "CONTAINERS_REGISTRIES_CONF": b / "registries.conf",
        }
        conmon_env = [f"PATH={PATH}", f"TMPDIR={b / 'tmp'}",
                      *(f"{k}={v}" for k, v in self.files.items()),
                      *(f"{k}={v}" for k, v in self.runtime_env.items())]
        ulimits = f"default_ulimits = {_toml_list(self.default_ulimits)}\n" \
            if self.default_ulimits else ""
        self.files["CONTAINERS_CONF"].write_text(
            "[containers]\n"
            f"{ulimits}"
            'netns = "none"\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            f"conmon_path = {_toml_list([CONMON])}\n"
            f"conmon_env_vars = {_toml_list(conmon_env)}\n"
            'events_logger = "file"\n'
            f'events_logfile_path = "{b}/events/events.log"\n'
            f"hooks_dir = {_toml_list([str(b / 'hooks')])}\n"
            f'image_copy_tmp_dir = "{b}/tmp"\n'
            'lock_type = "file"\n'
            'pull_policy = "never"\n'
            f'tmp_dir = "{self.tmpdir}"\n'
            f'volume_path = "{b}/volumes"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{b}/networks"\n'
        )
        self.files["CONTAINERS_STORAGE_CONF"].write_text(
            "[storage]\n"
            f'driver = "{self.storage_driver}"\n'
            f'graphroot = "{self.root}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        self.files["CONTAINERS_REGISTRIES_CONF"].write_text(
            "unqualified-search-registries = []\n")

    # -- the CLI ------------------------------------------------------------------

    def global_args(self) -> list[str]:
        return [
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.tmpdir),
            "--storage-driver", self.storage_driver,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--network-config-dir", str(self.base / "networks"),
            "--conmon", CONMON,
            "--runtime", str(self.runtime),
        ]

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONTAINERS_", "CONTAINER_", "REGISTRY_AUTH"))}
        return {**env, **{k: str(v) for k, v in self.files.items()},
                "TMPDIR": str(self.base / "tmp"), **self.runtime_env}

    def argv(self, *args: str) -> list[str]:
        for verb in _CGROUP_VERBS:
            if tuple(args[:len(verb)]) == verb:
                args = (*verb, f"--cgroup-parent=/{self.tag}", *args[len(verb):])
                break
        return ["podman", *self.global_args(), *args]

    def podman(self, *args: str, input: bytes | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, env=self.env,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def load_image(self, archive: Path) -> str:
        from tests.oci.images import load_archive

        self.image = load_archive(self.podman, archive)
        return self.image

    def container_ids(self) -> list[str]:
        result = self.podman("ps", "-aq", "--no-trunc", timeout=60)
        return result.stdout.decode().split()

    # -- clean-up -----------------------------------------------------------------

    def stop(self, keep_logs: Path | None = None) -> None:
        """Remove every container and the runtime's state of them, then clear
        what is left and remove this peer's directory (the events log copied
        to keep_logs first)."""
        with contextlib.suppress(subprocess.SubprocessError):
            self.podman("rm", "-af", "-t", "0", timeout=300)
        delete_runtime_containers(self.runtime, self.base)
        self.stopped = True
        if keep_logs is not None:
            keep(keep_logs, "podman", [self.base / "events" / "events.log"])
        clear_base(self.base, self.tag)

    def _idle_mounts(self) -> set[str]:
        # containers/storage keeps the driver's home bind-mounted on itself
        # (made private) between commands
        return {str(self.root / self.storage_driver)} if not self.stopped else set()

    def leftovers(self, settle: float = 10.0) -> list[str]:
        """Containers, conmon and container processes (command line, working
        directory or cgroups), mounts under this peer's directory other than
        the storage's own, cgroups of containers, runtime state of containers
        whose bundle was here; once stopped, also the directory itself."""
        return settled(self._leftovers, settle)

    def _leftovers(self) -> list[str]:
        found: list[str] = []
        if not self.stopped:
            found += [f"container {cid}" for cid in self.container_ids()]
        found += [f"process {pid}: {cmd}" for pid, cmd in processes_under(self.base, self.tag)]
        idle = self._idle_mounts()
        found += [f"mount {m}" for m in mounts_under(self.base) if m not in idle]
        found += [f"cgroup {c}" for c in cgroup_dirs(self.tag, children_only=not self.stopped)
                  if self.stopped or c.name != "conmon"]
        found += [f"runtime state {c.get('id')} (bundle {c.get('bundle')})"
                  for c in runtime_containers_under(self.runtime, self.base)]
        if self.stopped and self.base.exists():
            found.append(f"directory {self.base}")
        return found
