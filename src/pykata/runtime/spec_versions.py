"""Runtime-spec versions: which bundles pykata runs, and what becomes of the
fields that runtime-spec 1.0.2 to 1.3.0 added.

Engines newer than Debian 12's (containerd 2.x, recent docker and podman)
write `ociVersion` 1.2.0 or 1.3.0; the guest's crun 1.8.1 refuses any version
without "1.0" in it ("unknown version specified") and knows few of the newer
fields. So the host accepts every 1.x bundle, checks the newer fields here
before a VM boots, and the agent hands crun the spec as version 1.0.2
(pykata.agent.guest_spec). Each field is one of:

* applied in the guest: by crun (domainname, personality, user.umask,
  cpu.idle, unified, the newer seccomp actions and flags) or by the agent
  where crun 1.8.1 ignores it (ioPriority, scheduler, cpu.burst,
  memory.checkBeforeUpdate);
* refused, naming the field, when the guest cannot honour it
  (execCPUAffinity, time namespaces and timeOffsets, memoryPolicy, netDevices,
  idmapped mounts, seccomp notification to a host listener, the vm section);
* dropped with a logged note when it names the host only (intelRdt, rdma) or
  another platform, or when it asks for what the guest does anyway.

runtime-spec's rule for unknown properties (config.md, "Extensibility":
ignore them) holds for versions newer than MAX_VERSION; only a major version
other than 1 is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from pykata.errors import SpecError
from pykata.spec_fields import (
    GUEST_SECCOMP_ARCHES,
    IOPRIO_CLASSES,
    MAX_VERSION,
    PERSONALITY_DOMAINS,
    REALTIME_POLICIES,
    SCHED_FLAGS,
    SCHED_POLICIES,
    parse_version,
    unified_key_problem,
)

log = logging.getLogger(__name__)

_OTHER_PLATFORMS: Final = ("freebsd", "solaris", "windows", "zos")


def check_version(version: Any, where: str) -> tuple[int, int, int]:
    if not isinstance(version, str):
        raise SpecError(f"{where}: ociVersion must be a string")
    try:
        parsed = parse_version(version)
    except ValueError as exc:
        raise SpecError(f"{where}: ociVersion {exc}") from None
    if parsed[0] != 1:
        raise SpecError(
            f"{where}: ociVersion {version} is runtime-spec major version {parsed[0]}; "
            f"pykata runs version 1 bundles (1.0.0 to {MAX_VERSION}, and later 1.x)",
            hint="write the bundle for runtime-spec 1.x")
    return parsed


def poststart_failure_stops(spec: dict[str, Any]) -> bool:
    """Whether a failing poststart hook fails `start` and stops the container
    (runtime-spec 1.3.0); before 1.3.0 it was a warning only."""
    try:
        return parse_version(spec.get("ociVersion", "")) >= (1, 3, 0)
    except (TypeError, ValueError):
        return False


def check_bundle_fields(spec: dict[str, Any], where: str) -> None:
    """Refuse what the guest cannot honour, log what is dropped. `spec` has
    passed the protocol's type checks already (pykata.protocols.oci_spec)."""
    notes: list[str] = []
    process = spec.get("process")
    if isinstance(process, dict):
        check_process(process, f"{where}: process", exec_process=False)
    if isinstance(spec.get("vm"), dict):
        _refuse(f"{where}: vm", "pykata chooses the hypervisor, the guest kernel and its "
                "image itself", "leave vm out: pykata's configuration sets them, and the "
                "default_vcpus and default_memory annotations size a pod's VM")
    notes += [f"{name}: settings for another platform" for name in _OTHER_PLATFORMS
              if spec.get(name) is not None]
    for index, mount in enumerate(_list(spec, "mounts")):
        if isinstance(mount, dict):
            _check_mount(mount, f"{where}: mounts[{index}]")
    linux = spec.get("linux")
    if isinstance(linux, dict):
        notes += _check_linux(linux, where)
    _log_notes(where, notes)


def check_process(process: dict[str, Any], where: str, *, exec_process: bool) -> None:
    """The process fields of runtime-spec 1.1.0 and 1.2.1, for the container's
    process or (`exec_process`) one exec'd into it."""
    affinity = process.get("execCPUAffinity")
    if affinity is not None and affinity != {}:
        _refuse(f"{where}.execCPUAffinity", "crun 1.8.1 in the guest cannot pin a process "
                "between its joining the container's cgroup and its start, and the CPUs "
                "named are the host's, not the VM's", "leave execCPUAffinity out; "
                "linux.resources.cpu.cpus pins the container to the VM's vCPUs")
    ioprio = process.get("ioPriority")
    if isinstance(ioprio, dict):
        check_io_priority(ioprio, f"{where}.ioPriority")
    scheduler = process.get("scheduler")
    if isinstance(scheduler, dict):
        check_scheduler(scheduler, f"{where}.scheduler", exec_process=exec_process)


def check_io_priority(ioprio: dict[str, Any], where: str) -> None:
    klass, level = ioprio.get("class"), ioprio.get("priority", 0)
    if klass not in IOPRIO_CLASSES:
        raise SpecError(f"{where}.class: {klass!r} is not one of {', '.join(IOPRIO_CLASSES)}")
    if not isinstance(level, int) or not 0 <= level <= 7:
        raise SpecError(f"{where}.priority: {level!r} is not a level from 0 to 7")


def check_scheduler(scheduler: dict[str, Any], where: str, *, exec_process: bool) -> None:
    policy = scheduler.get("policy")
    if policy == "SCHED_ISO":
        raise SpecError(f"{where}.policy: Linux has no SCHED_ISO",
                        hint="choose SCHED_OTHER, SCHED_BATCH or SCHED_IDLE")
    if policy not in SCHED_POLICIES:
        raise SpecError(f"{where}.policy: {policy!r} is not one of {', '.join(SCHED_POLICIES)}")
    nice, priority = scheduler.get("nice", 0), scheduler.get("priority", 0)
    if not -20 <= nice <= 19:
        raise SpecError(f"{where}.nice: {nice} is not from -20 to 19")
    realtime = policy in REALTIME_POLICIES
    if realtime and not 1 <= priority <= 99:
        raise SpecError(f"{where}.priority: {policy} needs a priority from 1 to 99")
    if not realtime and priority != 0:
        raise SpecError(f"{where}.priority: only SCHED_FIFO and SCHED_RR take a priority")
    if policy == "SCHED_DEADLINE" and not 0 < scheduler.get("runtime", 0) <= scheduler.get(
            "deadline", 0):
        raise SpecError(f"{where}: SCHED_DEADLINE needs 0 < runtime <= deadline")
    flags = scheduler.get("flags") or []
    for flag in flags:
        if flag not in SCHED_FLAGS:
            why = ("runtime-spec carries no clamp values for it" if "UTIL_CLAMP" in flag
                   else f"it is not one of {', '.join(SCHED_FLAGS)}")
            raise SpecError(f"{where}.flags: {flag}: {why}")
    if exec_process and (flags or policy == "SCHED_DEADLINE"):
        what = "SCHED_DEADLINE" if policy == "SCHED_DEADLINE" else ", ".join(flags)
        raise SpecError(
            f"{where}: {what} cannot be given to an exec'd process: it gets its scheduling "
            "from the crun exec that starts it, and neither a deadline task's fork nor a "
            "reset-on-fork setting carries it through",
            hint="set it on the container's process, or leave it out of the exec")


def check_resources(resources: dict[str, Any], where: str) -> list[str]:
    """`linux.resources` (also an update's): refuse or note; returns the notes."""
    notes: list[str] = []
    if resources.get("rdma"):
        notes.append("linux.resources.rdma: limits the host's RDMA devices; the VM has none")
    memory = resources.get("memory")
    if isinstance(memory, dict) and memory.get("useHierarchy") is not None:
        if memory["useHierarchy"] is not True:
            raise SpecError(f"{where}.memory.useHierarchy: the guest's cgroup v2 always "
                            "accounts memory hierarchically",
                            hint="leave useHierarchy out")
        notes.append("linux.resources.memory.useHierarchy: always so in cgroup v2")
    cpu = resources.get("cpu")
    if isinstance(cpu, dict):
        if cpu.get("idle") not in (None, 0, 1):
            raise SpecError(f"{where}.cpu.idle: {cpu['idle']} is neither 0 nor 1")
        burst, quota = cpu.get("burst"), cpu.get("quota")
        if burst is not None and isinstance(quota, int) and 0 < quota < burst:
            raise SpecError(f"{where}.cpu.burst: {burst} is larger than the quota {quota}")
    for key in resources.get("unified") or {}:
        check_unified_key(key, f"{where}.unified")
    return notes


def check_unified_key(key: str, where: str) -> None:
    """A cgroup v2 interface file of the container's own cgroup."""
    problem = unified_key_problem(key)
    if problem:
        raise SpecError(f"{where}: {problem}")


def absolute_mount_destinations(spec: dict[str, Any]) -> None:
    """runtime-spec 1.2.0 allows (deprecated) relative mount destinations,
    relative to "/": made absolute once, so volumes, mount points and crun
    all see the same path."""
    for mount in spec.get("mounts") or []:
        if isinstance(mount, dict):
            destination = mount.get("destination")
            if isinstance(destination, str) and destination and not destination.startswith("/"):
                mount["destination"] = "/" + destination


def _check_mount(mount: dict[str, Any], where: str) -> None:
    options = mount.get("options") or []
    idmap = [o for o in options if o in ("idmap", "ridmap")]
    if mount.get("uidMappings") or mount.get("gidMappings") or idmap:
        field = f"options: {idmap[0]}" if idmap else "uidMappings"
        _refuse(f"{where}.{field}", "an idmapped mount cannot be made in the guest: the "
                "files reach the VM over 9p or virtio-fs, which pykata's guest kernel "
                "cannot idmap",
                "leave the mapping out, or give the files the owners the container expects")


def _check_linux(linux: dict[str, Any], where: str) -> list[str]:
    notes: list[str] = []
    for name, check in _LINUX_CHECKS.items():
        if linux.get(name) is not None:
            notes += check(linux[name], f"{where}: linux.{name}")
    for namespace in _list(linux, "namespaces"):
        if isinstance(namespace, dict) and namespace.get("type") == "time":
            _refuse(f"{where}: linux.namespaces: time", "crun 1.8.1 in the guest fails to make "
                    "a time namespace under pykata's guest kernel",
                    "leave the time namespace (and timeOffsets) out")
    return notes


def _personality(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict) or value.get("domain") not in PERSONALITY_DOMAINS:
        raise SpecError(f"{where}.domain: must be one of {', '.join(PERSONALITY_DOMAINS)}")
    if value.get("flags"):
        raise SpecError(f"{where}.flags: runtime-spec defines no personality flags",
                        hint="leave flags out")
    return []


def _time_offsets(value: Any, where: str) -> list[str]:
    if value:
        _refuse(where, "crun 1.8.1 in the guest neither makes a time namespace nor sets "
                "its offsets", "leave timeOffsets out")
    return []


def _memory_policy(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict) or not isinstance(value.get("mode"), str):
        raise SpecError(f"{where}.mode: a memory policy needs a mode")
    mode = value["mode"]
    if mode in ("MPOL_DEFAULT", "MPOL_LOCAL") and not value.get("nodes") \
            and not value.get("flags"):
        return [f"linux.memoryPolicy: {mode} is what every allocation gets in the VM, "
                "which has a single memory node"]
    _refuse(where, "the VM has a single memory node and pykata's guest kernel no NUMA "
            "policies; the nodes named are the host's, and pykata does not place a "
            "container's memory on them", "leave memoryPolicy out")
    return []


def _net_devices(value: Any, where: str) -> list[str]:
    if value:
        _refuse(where, "pykata cannot move a host network device into a VM: the VM's "
                "interfaces are made, before it boots, from those of the pod's network "
                "namespace", "move the device into the pod's network namespace instead "
                "(veth, macvlan, ipvlan, tap and tun interfaces are mirrored)")
    return []


def _intel_rdt(value: Any, where: str) -> list[str]:
    return ["linux.intelRdt: sets the host's cache and memory bandwidth allocation "
            "(resctrl), which the VM does not have"] if value else []


def _resources(value: Any, where: str) -> list[str]:
    return check_resources(value, where) if isinstance(value, dict) else []


def _seccomp(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    notes: list[str] = []
    arches = value.get("architectures") or []
    if arches and not GUEST_SECCOMP_ARCHES.intersection(arches):
        raise SpecError(f"{where}.architectures: the filter is for {', '.join(arches)} only; "
                        "pykata's VMs are x86_64", hint="add SCMP_ARCH_X86_64")
    foreign = sorted(set(arches) - GUEST_SECCOMP_ARCHES)
    if foreign:
        notes.append(f"linux.seccomp.architectures: {', '.join(foreign)} cannot occur in "
                     "an x86_64 VM")
    listener = value.get("listenerPath")
    if listener:
        actions = [value.get("defaultAction")] + [
            rule.get("action") for rule in value.get("syscalls") or [] if isinstance(rule, dict)]
        if "SCMP_ACT_NOTIFY" in actions:
            _refuse(f"{where}.listenerPath", f"the seccomp agent listening at {listener} is on "
                    "the host, and the notifications of the guest's filter cannot reach it",
                    "remove the SCMP_ACT_NOTIFY rules")
        notes.append("linux.seccomp.listenerPath: no SCMP_ACT_NOTIFY rule uses it")
    return notes


_LINUX_CHECKS: Final[dict[str, Callable[[Any, str], list[str]]]] = {
    "personality": _personality,
    "timeOffsets": _time_offsets,
    "memoryPolicy": _memory_policy,
    "netDevices": _net_devices,
    "intelRdt": _intel_rdt,
    "resources": _resources,
    "seccomp": _seccomp,
}


def _refuse(name: str, why: str, what_to_do: str) -> None:
    raise SpecError(f"{name}: not supported: {why}", hint=what_to_do)


def _list(parent: dict[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    return value if isinstance(value, list) else []


def _log_notes(where: str, notes: list[str]) -> None:
    for note in notes:
        log.warning("%s: %s: dropped", where, note)
