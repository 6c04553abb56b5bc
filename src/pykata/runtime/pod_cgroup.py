"""The pod's cgroup on the host (`[runtime] sandbox_cgroup_only`).

Every host process of a pod (its owner, QEMU, and what they start) runs in
the cgroup its spec names, so the host's CPU and memory limits hold for the
pod's real cost and the engines' accounting (`docker stats`, the kubelet)
sees it. The limits are the pod's containers' summed, as the kubelet sums a
pod's: a dimension is limited only when every container is limited in it,
plus the configured overhead for the VM itself. The guest keeps applying
each container's own limits inside the VM.

A CRI pod's sandbox container (its pause) asks for nothing: its cgroup is the
pod's, and the pod's limits follow the containers created and deleted in it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.channels import CONTAINER_TYPE_KEY
from pykata.config import RuntimeConfig
from pykata.errors import PykataError, SpecError
from pykata.host.cgroups import CgroupError, CgroupPath, HostCgroup, Limits, host_layout

log = logging.getLogger(__name__)

MIB = 1 << 20
# The host memory a pod's VM needs to boot and idle, for a VM of 512 MiB:
# measured here, a cold pod peaks at about 200 MiB in its cgroup (QEMU's
# own memory and the guest's, the initrd unpacked in it) and is killed
# during boot at 176 MiB. A larger guest needs more for its page tables and
# page descriptors (about 1/64 of its RAM), hence the part that grows with it.
MINIMUM_BASE_MIB = 208
MINIMUM_PER_GUEST_RAM = 1 / 32
CPU_PERIOD_US = 100_000
# The kernel refuses a CFS quota below 1 ms.
MIN_CPU_QUOTA_US = 1_000


@dataclass(frozen=True)
class CgroupPlacement:
    """Where a pod's spec puts it on the host: `linux.cgroupsPath`, and
    whether the engine uses systemd's form for it."""

    path: str
    systemd: bool = False

    def parsed(self) -> CgroupPath:
        return CgroupPath.parse(self.path, systemd=self.systemd)


def placement_from_spec(spec: Mapping[str, Any], *, systemd: bool = False
                        ) -> CgroupPlacement | None:
    """The spec's cgroupsPath, checked now (a bad one fails before a VM
    boots); None when it names none (the pod then stays where its owner is)."""
    linux = spec.get("linux")
    path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not path:
        return None
    if not isinstance(path, str):
        raise SpecError("linux.cgroupsPath must be a string")
    from pykata.host.cgroups import is_systemd_path

    placement = CgroupPlacement(path, systemd or is_systemd_path(path))
    try:
        placement.parsed()
    except CgroupError as exc:
        raise SpecError(f"linux.cgroupsPath: {exc.message}", hint=exc.hint) from None
    return placement


@dataclass(frozen=True)
class ContainerRequest:
    """What one container asks of the pod's limits (None: unlimited)."""

    cpus: float | None = None
    shares: int | None = None
    memory_bytes: int | None = None
    # A CRI pod's sandbox container: it asks for nothing.
    counted: bool = True


# A container that asks for nothing (and a pod made for none yet).
NO_REQUEST = ContainerRequest()


def container_request(spec: Mapping[str, Any]) -> ContainerRequest:
    annotations = spec.get("annotations") or {}
    counted = annotations.get(CONTAINER_TYPE_KEY) != "sandbox"
    linux = spec.get("linux") if isinstance(spec.get("linux"), dict) else {}
    return request_from_resources((linux or {}).get("resources"), counted=counted)


def request_from_resources(resources: Any, *, counted: bool = True) -> ContainerRequest:
    if not isinstance(resources, Mapping):
        return ContainerRequest(counted=counted)
    cpu, memory = _section(resources, "cpu"), _section(resources, "memory")
    quota, period = _int(cpu.get("quota")), _int(cpu.get("period")) or CPU_PERIOD_US
    shares = _int(cpu.get("shares"))
    limit = _int(memory.get("limit"))
    return ContainerRequest(
        cpus=quota / period if quota is not None and quota > 0 and period > 0 else None,
        shares=shares if shares is not None and shares > 0 else None,
        memory_bytes=limit if limit is not None and limit > 0 else None,
        counted=counted)


def merge_update(old: ContainerRequest, resources: Mapping[str, Any]) -> ContainerRequest:
    """A container's request after an `update` that gives `resources`: what
    it leaves out stays as it was."""
    new = request_from_resources(resources, counted=old.counted)
    cpu, memory = _section(resources, "cpu"), _section(resources, "memory")
    return ContainerRequest(
        cpus=new.cpus if "quota" in cpu else old.cpus,
        shares=new.shares if "shares" in cpu else old.shares,
        memory_bytes=new.memory_bytes if "limit" in memory else old.memory_bytes,
        counted=old.counted)


def _section(resources: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = resources.get(name)
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def pod_limits(requests: Sequence[ContainerRequest], config: RuntimeConfig) -> Limits:
    """The pod's host limits: each dimension summed over its counted
    containers when all are limited in it, plus the VM's overhead."""
    counted = [r for r in requests if r.counted]
    if not counted:
        return Limits(cpu_period_us=CPU_PERIOD_US)
    quota = None
    if all(r.cpus is not None for r in counted):
        cpus = sum(r.cpus or 0.0 for r in counted) + config.sandbox_overhead_millicpus / 1000
        # Rounded first: 0.5 + 0.05 CPUs must not come out as 55001 µs.
        quota = max(MIN_CPU_QUOTA_US, math.ceil(round(cpus * CPU_PERIOD_US, 3)))
    shares = (sum(r.shares or 0 for r in counted)
              if all(r.shares is not None for r in counted) else None)
    memory = None
    if all(r.memory_bytes is not None for r in counted):
        memory = (sum(r.memory_bytes or 0 for r in counted)
                  + config.sandbox_overhead_memory_mib * MIB)
    return Limits(cpu_quota_us=quota, cpu_period_us=CPU_PERIOD_US,
                  cpu_shares=min(shares, 262144) if shares else None, memory_bytes=memory)


def widest(a: Limits, b: Limits) -> Limits:
    """Each limit the larger of the two (no limit wins): what holds both
    while a change is under way."""
    def larger(x: int | None, y: int | None) -> int | None:
        return None if x is None or y is None else max(x, y)

    return Limits(cpu_quota_us=larger(a.cpu_quota_us, b.cpu_quota_us),
                  cpu_period_us=CPU_PERIOD_US,
                  cpu_shares=larger(a.cpu_shares, b.cpu_shares),
                  memory_bytes=larger(a.memory_bytes, b.memory_bytes))


def minimum_memory_mib(vm_memory_mib: int) -> int:
    """The least host memory a pod whose VM has `vm_memory_mib` can run in."""
    return MINIMUM_BASE_MIB + math.ceil(vm_memory_mib * MINIMUM_PER_GUEST_RAM)


def check_memory(limits: Limits, vm_memory_mib: int, config: RuntimeConfig) -> None:
    """Refuse a pod memory limit its VM cannot run in, saying the minimum."""
    if limits.memory_bytes is None:
        return
    need = minimum_memory_mib(vm_memory_mib)
    have = limits.memory_bytes // MIB
    if have >= need:
        return
    overhead = config.sandbox_overhead_memory_mib
    raise SpecError(
        f"the pod's memory limit is too small for its VM: {have - overhead} MiB for its "
        f"containers plus {overhead} MiB of overhead is {have} MiB on the host, and a pod "
        f"whose VM has {vm_memory_mib} MiB needs at least {need} MiB",
        hint=f"give the containers at least {need - overhead} MiB, or raise [runtime] "
             "sandbox_overhead_memory_mib")


class PodCgroup:
    """The pod's host cgroup: made before its VM, joined by its owner (and
    by a VM handed over), resized as its containers come and go, removed
    after the VM. `record` is called whenever the set of directories pykata
    made changes (they go into the sandbox's saved state)."""

    def __init__(self, placement: CgroupPlacement | None, config: RuntimeConfig,
                 vm_memory_mib: int, record: Callable[[], None]) -> None:
        self.placement = placement if config.sandbox_cgroup_only else None
        self.config = config
        self.vm_memory_mib = vm_memory_mib
        self._record = record
        self.cgroup: HostCgroup | None = None
        self.limits = Limits(cpu_period_us=CPU_PERIOD_US)
        self._joined = False
        self._claimed = False

    @property
    def wanted(self) -> bool:
        return self.placement is not None

    @property
    def created(self) -> list[str]:
        return [str(p) for p in self.cgroup.created] if self.cgroup is not None else []

    def check(self, limits: Limits) -> None:
        """What `prepare` refuses, before anything is made."""
        if self.placement is None:
            return
        check_memory(limits, self.vm_memory_mib, self.config)

    def prepare(self, limits: Limits) -> None:
        """Make the cgroup with `limits` and move this process (the pod's
        owner) in: everything it starts from now on is the pod's."""
        if self.placement is None:
            return
        check_memory(limits, self.vm_memory_mib, self.config)
        _claim_process()
        self._claimed = True
        try:
            cgroup = HostCgroup.plan(self.placement.parsed(), host_layout())
            cgroup.check_controllers(limits)
            self.cgroup = cgroup
            cgroup.create()
            self._record()
            cgroup.apply(limits)
            self.limits = limits
            cgroup.join_self()
            self._joined = True
        except BaseException:
            self.release()
            raise
        log.info("pod cgroup %s (%s)", self.placement.path, _describe(limits))

    def adopt(self, pid: int) -> None:
        """Move a process started outside the pod (a VM the cache booted) in,
        its memory charges along where the host can move them."""
        if self.cgroup is None:
            return
        self.cgroup.move_charges()
        self.cgroup.join(pid)

    def resize(self, limits: Limits) -> None:
        """New limits for the pod (its containers changed, or an update)."""
        if self.cgroup is None or limits == self.limits:
            return
        check_memory(limits, self.vm_memory_mib, self.config)
        try:
            self.cgroup.apply(limits)
        except CgroupError:
            # apply may have stopped part-way: hold what was asked and what
            # was there, whichever is larger, so no hierarchy is left lower.
            with contextlib.suppress(CgroupError):
                self.cgroup.apply(widest(self.limits, limits))
                self.limits = widest(self.limits, limits)
            raise
        self.limits = limits
        log.info("pod cgroup %s resized (%s)", self.placement and self.placement.path,
                 _describe(limits))

    def fit(self, limits: Limits) -> None:
        """Resize to `limits`; where the pod's use refuses a smaller limit,
        keep the larger of old and new (logged): a pod is never broken by
        giving back less than asked."""
        try:
            self.resize(limits)
        except CgroupError as exc:
            self.resize(widest(self.limits, limits))
            log.warning("pod cgroup %s keeps larger limits (%s): %s",
                        self.placement and self.placement.path, _describe(self.limits), exc)

    def release(self) -> None:
        """This process leaves, and what pykata made goes; safe to repeat."""
        cgroup = self.cgroup
        if cgroup is not None:
            if self._joined:
                cgroup.leave_self()
                self._joined = False
            for problem in cgroup.remove():
                log.warning("pod cgroup: %s", problem)
            self._record()
            if not cgroup.created:
                self.cgroup = None
        if self._claimed:
            self._claimed = False
            _release_process()

    def death_note(self) -> str:
        """Why the VM may have died, from the host's side ("" if not this)."""
        if self.cgroup is None:
            return ""
        kills = self.cgroup.oom_kills()
        if not kills:
            return ""
        limit = self.limits.memory_bytes
        return (f"the host's memory limit for the pod ({limit // MIB if limit else '?'} MiB in "
                f"cgroup {self.placement.path if self.placement else '?'}) killed "
                f"{kills} process(es) of the pod: raise the pod's memory limit or [runtime] "
                "sandbox_overhead_memory_mib")


def remove_recorded(paths: Sequence[str]) -> None:
    """Remove the cgroups a dead owner recorded (`pykata cleanup`)."""
    from pykata.host.cgroups import remove_dirs

    for problem in remove_dirs([Path(p) for p in paths]):
        log.warning("pod cgroup: %s", problem)


def _describe(limits: Limits) -> str:
    cpu = (f"{limits.cpu_quota_us / limits.cpu_period_us:.2f} CPUs"
           if limits.cpu_quota_us is not None else "CPU unlimited")
    memory = (f"{limits.memory_bytes // MIB} MiB" if limits.memory_bytes is not None
              else "memory unlimited")
    return f"{cpu}, {memory}"


# One pod per owner process may place it: joining a second pod's cgroup
# would take the first pod's QEMU's parent out of its own.
_owner: list[int] = []


def _claim_process() -> None:
    if _owner:
        raise PykataError("this process already owns a pod with a host cgroup",
                          hint="each pod needs its own owner process")
    _owner.append(1)


def _release_process() -> None:
    with contextlib.suppress(IndexError):
        _owner.pop()
