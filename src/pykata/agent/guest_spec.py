"""The OCI spec as the host sent it, made right for the guest.

The host already placed the rootfs and volumes at guest paths. What is left
here is what only the guest knows or what cannot apply inside it: its cgroup
layout, which namespaces the pod's containers share, and host-only settings
(the hooks that run on the host, LSM labels, the host network namespace,
resources that name host devices).

Container engines write specs for runc on the host; what they say about the
host is dropped here rather than refused, so a spec docker 20.10 or podman 4.3
writes creates a container unchanged (tests/unit/test_guest_spec.py keeps
their specs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "/pykata"

# Namespaces a container may share with its pod's sandbox container; a path the
# host gave for any other namespace names a host object and is dropped.
_SHAREABLE = {"pid", "ipc", "uts"}
# /proc/<pid>/ns/<name> for each OCI namespace type.
_NS_FILE = {"pid": "pid", "ipc": "ipc", "uts": "uts"}

# The hooks that run in the container's namespaces, which exist only in the
# guest: crun runs them there (runtime-spec config.md, "POSIX-platform Hooks").
# prestart, createRuntime, poststart and poststop run in the runtime's
# namespace, which is the host's: the host runs them (pykata.runtime.hooks),
# and their paths name host files that crun must never run in the guest.
GUEST_HOOKS = ("createContainer", "startContainer")


def for_guest(
    spec: dict[str, Any],
    container_id: str,
    *,
    sandbox_pid: int | None,
    share_pid_ns: bool,
    controllers: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Rewrite `spec` in place for crun in this guest and return it.

    `sandbox_pid` is the init pid of the pod's sandbox container, when this
    container joins a pod that has one; `share_pid_ns` says the pod asked for
    one PID namespace for all its containers; `controllers` are the guest's
    cgroup controllers (None: read them).
    """
    linux = spec.setdefault("linux", {})
    # Whatever the engine's cgroup driver wrote ("system.slice:docker:ID" for
    # systemd, "/docker/ID" for cgroupfs) names a host cgroup; the guest has
    # no systemd and crun runs with its cgroupfs manager.
    linux["cgroupsPath"] = f"{CGROUP_PARENT}/{container_id}"
    linux["namespaces"] = _namespaces(
        linux.get("namespaces", []), sandbox_pid=sandbox_pid, share_pid_ns=share_pid_ns
    )
    _keep_guest_hooks(spec, container_id)
    resources = linux.get("resources")
    if isinstance(resources, dict):
        linux["resources"] = guest_resources(resources, container_id, controllers)
    linux.pop("mountLabel", None)
    linux.pop("intelRdt", None)
    process = spec.get("process")
    if isinstance(process, dict):
        # The guest kernel has no AppArmor or SELinux: crun would fail to
        # apply a profile or label it cannot find.
        process.pop("apparmorProfile", None)
        process.pop("selinuxLabel", None)
    return spec


def take_pod_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """Remove from `spec` the sysctls of the pod's network namespace and
    return them, for the agent to set itself.

    Containers use the VM's network namespace (see `_namespaces`), so crun
    refuses any `net.*` sysctl ("requires a new network namespace"). That
    namespace is the pod's, as the one an engine made on the host would be:
    setting them there is what runc does with a pod's shared network
    namespace (podman writes net.ipv4.ping_group_range for every container).
    Call after `for_guest`.
    """
    linux = spec.get("linux")
    if not isinstance(linux, dict) or not isinstance(linux.get("sysctl"), dict):
        return {}
    if any(ns.get("type") == "network" for ns in linux.get("namespaces", [])):
        return {}
    sysctl: dict[str, str] = linux["sysctl"]
    pod = {key: value for key, value in sysctl.items() if key.startswith("net.")}
    linux["sysctl"] = {key: value for key, value in sysctl.items() if key not in pod}
    if not linux["sysctl"]:
        del linux["sysctl"]
    return pod


def guest_resources(
    resources: dict[str, Any], container_id: str, controllers: frozenset[str] | None = None
) -> dict[str, Any]:
    """`linux.resources` without what cannot apply in the guest (also for
    updates). `controllers` are the guest's cgroup v2 controllers (None: read
    them from /sys/fs/cgroup)."""
    if controllers is None:
        controllers = cgroup_controllers()
    out = dict(resources)
    if "hugetlb" not in controllers and out.pop("hugepageLimits", None) is not None:
        # Without the controller the guest kernel has no huge pages to limit;
        # kubelet writes a limit for each of the node's page sizes.
        log.info("container %s: no huge pages in the guest, hugepageLimits dropped",
                 container_id)
    if out.pop("blockIO", None) is not None:
        # Its device rules name host block devices (major:minor), and the
        # container's files reach the guest over 9p, not a block device; crun
        # would also need io.max, which the guest kernel has not got. docker
        # writes blockIO {"weight": 0} for every container.
        log.info("container %s: linux.resources.blockIO does not apply in the guest",
                 container_id)
    if out.pop("network", None) is not None:
        # net_cls and net_prio exist only in cgroup v1 (crun: "network limits
        # not supported on cgroupv2"); the guest has v2, and the VM's network
        # interfaces are the pod's, shaped on the host if at all.
        log.info("container %s: linux.resources.network does not apply in the guest",
                 container_id)
    return out


def cgroup_controllers(root: Path = CGROUP_ROOT) -> frozenset[str]:
    try:
        return frozenset((root / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def _keep_guest_hooks(spec: dict[str, Any], container_id: str) -> None:
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict):
        spec.pop("hooks", None)
        return
    kept = {phase: hooks[phase] for phase in GUEST_HOOKS if hooks.get(phase)}
    dropped = sorted(phase for phase, entries in hooks.items()
                     if entries and phase not in kept)
    if dropped:
        log.info("container %s: hooks %s run on the host, not in the guest",
                 container_id, ", ".join(dropped))
    if kept:
        spec["hooks"] = kept
    else:
        spec.pop("hooks", None)


def _namespaces(
    entries: list[dict[str, Any]], *, sandbox_pid: int | None, share_pid_ns: bool
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in entries:
        kind = entry.get("type", "")
        if kind == "network":
            # Containers use the VM's network namespace: the VM is the pod's
            # network boundary, and its interfaces are the pod's.
            continue
        # The host asks for sharing by giving a path (on the host, the sandbox
        # container's namespace); in the guest that is the sandbox's init.
        share = bool(entry.get("path")) and kind in _SHAREABLE and sandbox_pid is not None
        if kind == "pid":
            share = share and share_pid_ns
        if share:
            out.append({"type": kind, "path": f"/proc/{sandbox_pid}/ns/{_NS_FILE[kind]}"})
        else:
            out.append({"type": kind})
    return out
