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

Newer engines write runtime-spec 1.2 and 1.3, which the guest's crun 1.8.1
refuses by version alone: the host checked the newer fields
(pykata.runtime.spec_versions), and crun gets the spec as version 1.0.2 with
the newer settings it would ignore taken out for the agent to apply (see
pykata.agent.process_attrs) or turned into ones it knows (cpu.burst).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pykata.spec_fields import (
    GUEST_SECCOMP_ARCHES,
    GUEST_VERSION,
    parse_version,
    unified_key_problem,
)
from pykata.ttrpc import Code, StatusError

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
    _guest_version(spec)
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
    seccomp = linux.get("seccomp")
    if isinstance(seccomp, dict) and seccomp.get("architectures"):
        seccomp["architectures"] = _guest_arches(seccomp["architectures"], container_id)
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
    _newer_resources(out)
    return out


def _newer_resources(resources: dict[str, Any]) -> None:
    """runtime-spec 1.1.0's resources, as crun 1.8.1 can take them."""
    unified = resources.get("unified")
    for key in unified or {}:
        problem = unified_key_problem(key)
        if problem:
            raise StatusError(Code.INVALID_ARGUMENT, f"linux.resources.unified: {problem}")
    memory = resources.get("memory")
    if isinstance(memory, dict) and "checkBeforeUpdate" in memory:
        # The agent checks it at an update (Containers.update); crun ignores it.
        resources["memory"] = {k: v for k, v in memory.items() if k != "checkBeforeUpdate"}
    cpu = resources.get("cpu")
    if isinstance(cpu, dict) and cpu.get("burst") is not None:
        # crun 1.8.1 ignores cpu.burst but writes any unified file, after
        # cpu.max, which a burst may not exceed.
        resources["cpu"] = {k: v for k, v in cpu.items() if k != "burst"}
        resources["unified"] = {"cpu.max.burst": str(cpu["burst"]), **(unified or {})}


def _guest_version(spec: dict[str, Any]) -> None:
    """crun 1.8.1 refuses a version without "1.0" in it ("unknown version
    specified"); any 1.x spec the host sent (or one naming no version) is
    handed over as 1.0.2."""
    version = spec.get("ociVersion") or GUEST_VERSION
    try:
        major = parse_version(version)[0] if isinstance(version, str) else None
    except ValueError:
        major = None
    if major != 1:
        raise StatusError(Code.INVALID_ARGUMENT,
                          f"ociVersion {version!r}: only runtime-spec 1.x specs are run")
    spec["ociVersion"] = GUEST_VERSION


def _guest_arches(arches: list[str], container_id: str) -> list[str]:
    """Only the architectures an x86_64 kernel can be entered with: a rule for
    another never matches here, and crun's libseccomp may not know its name
    (crun 1.8.1: "seccomp unknown architecture LOONGARCH64")."""
    kept = [arch for arch in arches if arch in GUEST_SECCOMP_ARCHES]
    if not kept:
        raise StatusError(Code.INVALID_ARGUMENT,
                          "linux.seccomp.architectures: none is an x86 architecture")
    if len(kept) < len(arches):
        log.info("container %s: seccomp architectures %s dropped: not x86", container_id,
                 ", ".join(a for a in arches if a not in GUEST_SECCOMP_ARCHES))
    return kept


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
