"""The host's cgroups: which hierarchies are mounted, where a cgroup path
lands in each, and making, limiting, joining and removing a cgroup.

Three layouts exist: cgroup v2 alone (one hierarchy, its controllers enabled
level by level through `cgroup.subtree_control`), v1 (a hierarchy per
controller or group of controllers, each mounted on its own), and hybrid
(v1 hierarchies plus a v2 one with no controllers, usually at
/sys/fs/cgroup/unified). A cgroup is made in every hierarchy, so a process
placed in it is there in all of them, as a container runtime on the host
would place it.

Paths come from a spec: an absolute path is taken from each hierarchy's
root, a relative one from the cgroup the calling process is in, and
systemd's `slice:prefix:name` form is laid out as systemd lays it out
(`expand_systemd`). Every component is checked: nothing here can name a
directory outside a cgroup filesystem, nor the root cgroup itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pykata.errors import HostError
from pykata.host.mounts import unescape_mountinfo

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP_SUPER_MAGIC = 0x27E0EB
CGROUP2_SUPER_MAGIC = 0x63677270
# Controllers a pod's cgroup is given on cgroup v2 where the host has them:
# cpu and memory for its limits, pids and io for what engines report of it.
V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
# How long a removal waits for processes that just exited to leave.
REMOVE_WAIT_SECONDS = 2.0
_NAME_MAX = 255
# Controllers whose files ("memory.max", "cpuset.cpus") a cgroup directory
# holds: a child named like one would block or shadow them.
_CONTROLLER_NAMES = frozenset({
    "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "io", "memory",
    "misc", "net_cls", "net_prio", "perf_event", "pids", "rdma", "cgroup"})


class CgroupError(HostError):
    pass


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    mount: Path
    # Which cgroup of the hierarchy the mount shows (a container's view may
    # start below the hierarchy's root).
    root: str
    version: int
    # v1: the hierarchy's controllers ("cpu", "cpuacct", "name=systemd");
    # v2: those its root cgroup offers (cgroup.controllers).
    controllers: frozenset[str]

    def has(self, controller: str) -> bool:
        return controller in self.controllers

    def key(self) -> str:
        """How /proc/PID/cgroup names this hierarchy (its second field)."""
        if self.version == 2:
            return ""
        return ",".join(sorted(self.controllers))


@dataclass(frozen=True)
class Layout:
    hierarchies: tuple[Hierarchy, ...]

    @property
    def mode(self) -> str:
        """"v2", "v1", "hybrid", or "none" (no cgroup filesystem mounted)."""
        versions = {h.version for h in self.hierarchies}
        if not versions:
            return "none"
        if versions == {2}:
            return "v2"
        return "hybrid" if 2 in versions else "v1"

    def with_controller(self, controller: str) -> Hierarchy | None:
        for h in self.hierarchies:
            if h.has(controller):
                return h
        return None


def parse_mountinfo(text: str) -> Layout:
    """The cgroup hierarchies in a mountinfo file's text; a hierarchy mounted
    twice counts once (the first mount)."""
    found: list[Hierarchy] = []
    seen: set[tuple[int, str]] = set()
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_ = left.split()
        tail = right.split()
        if len(fields_) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2]
        root, mount = unescape_mountinfo(fields_[3]), Path(unescape_mountinfo(fields_[4]))
        if fstype == "cgroup2":
            if (2, "") in seen:
                continue
            seen.add((2, ""))
            found.append(Hierarchy(mount, root, 2, _v2_controllers(mount)))
        elif fstype == "cgroup":
            controllers = frozenset(
                o for o in options.split(",")
                if o not in ("rw", "ro") and (o.startswith("name=") or "=" not in o)
                and o not in _V1_MOUNT_FLAGS)
            key = (1, ",".join(sorted(controllers)))
            if not controllers or key in seen:
                continue
            seen.add(key)
            found.append(Hierarchy(mount, root, 1, controllers))
    return Layout(tuple(found))


# Options of a v1 cgroup mount that are not controllers.
_V1_MOUNT_FLAGS = frozenset({"relatime", "noatime", "nosuid", "nodev", "noexec", "xattr",
                             "clone_children", "noprefix", "cpuset_v2_mode", "favordynmods",
                             "nsdelegate", "memory_recursiveprot", "memory_localevents"})


def _v2_controllers(mount: Path) -> frozenset[str]:
    try:
        return frozenset((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def host_layout(mountinfo: Path = MOUNTINFO) -> Layout:
    try:
        return parse_mountinfo(mountinfo.read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read {mountinfo}: {exc.strerror}") from None


def process_cgroups(pid: int | str = "self") -> dict[str, str]:
    """Each hierarchy's cgroup of a process, by `Hierarchy.key`."""
    found: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read the cgroups of process {pid}: {exc.strerror}"
                          ) from None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found[",".join(sorted(parts[1].split(","))) if parts[1] else ""] = parts[2]
    return found


def join_cgroups_of(pid: int) -> None:
    """Move this process into every cgroup process `pid` is in (a pod's
    helper joins its owner)."""
    theirs = process_cgroups(pid)
    for h in host_layout().hierarchies:
        where = theirs.get(h.key())
        if where is not None:
            _write(directory_of(h, PurePosixPath(where)) / "cgroup.procs", str(os.getpid()))


# --- paths -------------------------------------------------------------------

SYSTEMD_DEFAULT_SLICE = "system.slice"


def is_systemd_path(path: str) -> bool:
    """Whether `path` is in systemd's `slice:prefix:name` form."""
    parts = path.split(":")
    return len(parts) == 3 and not path.startswith("/") and "/" not in path


def expand_systemd(path: str) -> str:
    """`slice:prefix:name` as the absolute cgroup path systemd gives that unit:
    the slice's ancestors first (`a-b.slice` is `a.slice/a-b.slice`), then
    `prefix-name.scope` (or `name` itself when it is a slice)."""
    if not is_systemd_path(path):
        raise CgroupError(f"cgroupsPath {path!r} is not in systemd's slice:prefix:name form",
                          hint="give a path such as system.slice:pykata:ID, or drop "
                               "--systemd-cgroup to use a cgroupfs path")
    slice_, prefix, name = path.split(":")
    if not name:
        raise CgroupError(f"cgroupsPath {path!r} has no unit name",
                          hint="the form is slice:prefix:name")
    out = _expand_slice(slice_ or SYSTEMD_DEFAULT_SLICE, path)
    if name.endswith(".slice"):
        # The unit is itself a slice: it must sit in the one named before it.
        return _expand_slice(name, path)
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return f"{out}/{unit}" if out != "/" else f"/{unit}"


def _expand_slice(slice_: str, whole: str) -> str:
    if slice_ == "-.slice":
        return "/"
    if not slice_.endswith(".slice"):
        raise CgroupError(f"cgroupsPath {whole!r}: {slice_!r} is not a slice",
                          hint="a slice's name ends in .slice")
    stem = slice_.removesuffix(".slice")
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise CgroupError(f"cgroupsPath {whole!r}: {slice_!r} is not a valid slice name")
    levels, acc = [], ""
    for word in stem.split("-"):
        acc = f"{acc}-{word}" if acc else word
        levels.append(f"{acc}.slice")
    return "/" + "/".join(levels)


def check_relative_parts(path: str, *, what: str) -> list[str]:
    """The components of a cgroup path, each a plain directory name."""
    parts = [p for p in path.split("/") if p]
    for part in parts:
        try:
            size = len(part.encode())
        except UnicodeEncodeError:
            size = _NAME_MAX + 1
        control = any(ord(c) < 32 or ord(c) == 127 for c in part)
        if part in (".", "..") or control or size > _NAME_MAX:
            raise CgroupError(f"{what} {path!r} is not a plain cgroup path",
                              hint="use directory names only: no '.', '..', empty parts or "
                                   "control characters")
        if part.partition(".")[0] in _CONTROLLER_NAMES and "." in part:
            raise CgroupError(f"{what} {path!r}: {part!r} is named like a cgroup control "
                              "file", hint="choose directory names that do not begin with "
                                           "a controller's name and a dot")
    return parts


@dataclass(frozen=True)
class CgroupPath:
    """Where a pod's cgroup goes: absolute (from each hierarchy's root) or
    relative to the owner's current cgroup in each hierarchy."""

    parts: tuple[str, ...]
    absolute: bool

    @classmethod
    def parse(cls, cgroups_path: str, *, systemd: bool) -> CgroupPath:
        if systemd:
            cgroups_path = expand_systemd(cgroups_path)
        parts = check_relative_parts(cgroups_path, what="cgroupsPath")
        if not parts:
            raise CgroupError(f"cgroupsPath {cgroups_path!r} names the root cgroup",
                              hint="give the pod a cgroup of its own, such as /pykata/ID")
        return cls(tuple(parts), cgroups_path.startswith("/"))

    def __str__(self) -> str:
        return ("/" if self.absolute else "") + "/".join(self.parts)

    def in_hierarchy(self, current: str, *, v2: bool = False) -> PurePosixPath:
        """The cgroup (from the hierarchy's root) this path names for a
        process whose cgroup there is `current`. On v2 a relative path is
        taken beside the owner's cgroup, as runc does: a v2 cgroup that holds
        processes can pass no controllers to children."""
        if self.absolute:
            return PurePosixPath("/").joinpath(*self.parts)
        base = PurePosixPath(current or "/")
        if ".." in base.parts or not base.is_absolute():
            raise CgroupError(f"this process's cgroup {current!r} lies outside its cgroup "
                              "namespace: a relative cgroupsPath cannot be placed",
                              hint="give an absolute cgroupsPath")
        return (base.parent if v2 else base).joinpath(*self.parts)


def directory_of(h: Hierarchy, cgroup: PurePosixPath) -> Path:
    """The directory of `cgroup` in the mount of `h`."""
    root = PurePosixPath(h.root or "/")
    try:
        rel = cgroup.relative_to(root)
    except ValueError:
        raise CgroupError(f"cgroup {cgroup} is outside the part of the hierarchy mounted at "
                          f"{h.mount} ({root})",
                          hint="give a cgroupsPath inside the cgroups this host shows") from None
    return h.mount.joinpath(*rel.parts)


def on_cgroupfs(path: Path) -> bool:
    """Whether `path` is a directory of a cgroup filesystem (statfs)."""
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    from pykata.host.syscalls import libc

    buf = _Statfs()
    if libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type in (CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC)


# --- limits ------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a cgroup is held to on the host; None: no limit."""

    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    cpu_shares: int | None = None
    memory_bytes: int | None = None

    def needs(self) -> set[str]:
        wanted = set()
        if self.cpu_quota_us is not None or self.cpu_shares is not None:
            wanted.add("cpu")
        if self.memory_bytes is not None:
            wanted.add("memory")
        return wanted


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) as v2's cpu.weight (1..10000)."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def v1_writes(h: Hierarchy, limits: Limits) -> list[tuple[str, str]]:
    """The files (and values) setting `limits` in v1 hierarchy `h`, in order."""
    writes: list[tuple[str, str]] = []
    if h.has("cpu"):
        # The period first: a quota is checked against the period in force.
        writes.append(("cpu.cfs_period_us", str(limits.cpu_period_us)))
        writes.append(("cpu.cfs_quota_us",
                       str(limits.cpu_quota_us) if limits.cpu_quota_us is not None else "-1"))
        if limits.cpu_shares is not None:
            writes.append(("cpu.shares", str(limits.cpu_shares)))
    if h.has("memory"):
        writes.append(("memory.limit_in_bytes",
                       str(limits.memory_bytes) if limits.memory_bytes is not None else "-1"))
    return writes


def v2_writes(limits: Limits, available: Iterable[str]) -> list[tuple[str, str]]:
    have = set(available)
    writes: list[tuple[str, str]] = []
    if "cpu" in have:
        quota = str(limits.cpu_quota_us) if limits.cpu_quota_us is not None else "max"
        writes.append(("cpu.max", f"{quota} {limits.cpu_period_us}"))
        if limits.cpu_shares is not None:
            writes.append(("cpu.weight", str(shares_to_weight(limits.cpu_shares))))
    if "memory" in have:
        writes.append(("memory.max", str(limits.memory_bytes)
                       if limits.memory_bytes is not None else "max"))
    return writes


# --- a cgroup in every hierarchy ---------------------------------------------------


@dataclass
class HostCgroup:
    """A cgroup in each hierarchy of the host: what pykata made of it, and
    where the processes it moved in came from."""

    path: CgroupPath
    layout: Layout
    # The directory of the cgroup in each hierarchy.
    dirs: dict[Hierarchy, Path] = field(default_factory=dict)
    # Directories pykata made (parents before children).
    created: list[Path] = field(default_factory=list)
    # Where the owner was before it joined, per hierarchy.
    _previous: dict[Hierarchy, Path] = field(default_factory=dict)

    @classmethod
    def plan(cls, path: CgroupPath, layout: Layout) -> HostCgroup:
        if not layout.hierarchies:
            raise CgroupError("this host has no cgroup filesystem mounted",
                              hint="mount the cgroup hierarchies (/sys/fs/cgroup), or set "
                                   "[runtime] sandbox_cgroup_only = false")
        current = process_cgroups()
        dirs = {h: directory_of(h, path.in_hierarchy(current.get(h.key(), "/"),
                                                     v2=h.version == 2))
                for h in layout.hierarchies}
        return cls(path, layout, dirs)

    def check_controllers(self, limits: Limits) -> None:
        """Refuse limits the host has no controller for."""
        for controller in sorted(limits.needs()):
            v1 = self.layout.with_controller(controller)
            if v1 is not None and v1.version == 1:
                continue
            v2 = next((h for h in self.layout.hierarchies if h.version == 2), None)
            if v2 is not None and controller in v2.controllers:
                continue
            raise CgroupError(
                f"the pod's {controller} limit cannot be applied on the host: no cgroup "
                f"hierarchy here has the {controller} controller",
                hint=f"enable the {controller} controller (cgroup v2: in the root's "
                     "cgroup.subtree_control), or set [runtime] sandbox_cgroup_only = false")

    def create(self) -> None:
        """Make the cgroup in every hierarchy (missing parents too); on v2,
        enable the controllers pods use on the way down. Undone by `remove`
        if it fails part-way."""
        try:
            for h, target in self.dirs.items():
                self._make(h, target)
                if target not in self.created:
                    _check_unused(target)
        except BaseException:
            self.remove()
            raise

    def _make(self, h: Hierarchy, target: Path) -> None:
        rel = target.relative_to(h.mount)
        here = h.mount
        for part in rel.parts:
            if h.version == 2:
                self._enable_below(here)
            here = here / part
            for _attempt in range(5):
                try:
                    os.mkdir(here, 0o755)
                except FileExistsError:
                    break
                except FileNotFoundError:
                    # A parent another pod made went away just now: make it again.
                    if not here.parent.exists():
                        self._make(h, here.parent)
                        if h.version == 2:
                            self._enable_below(here.parent)
                    continue
                except OSError as exc:
                    raise CgroupError(f"cannot create the cgroup {here}: {exc.strerror}",
                                      hint="check that pykata runs as root and that the "
                                           "cgroupsPath is one this host allows") from None
                else:
                    self.created.append(here)
                    if h.version == 1 and h.has("cpuset"):
                        _inherit_cpuset(here)
                    break

    def _enable_below(self, directory: Path) -> None:
        try:
            offered = set((directory / "cgroup.controllers").read_text().split())
            enabled = set((directory / "cgroup.subtree_control").read_text().split())
        except OSError as exc:
            raise CgroupError(f"cannot read the controllers of {directory}: {exc.strerror}"
                              ) from None
        missing = [c for c in V2_CONTROLLERS if c in offered and c not in enabled]
        if not missing:
            return
        try:
            _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except CgroupError as exc:
            raise CgroupError(
                f"cannot enable the {', '.join(missing)} controllers below {directory}: "
                f"{exc.message}",
                hint="cgroup v2 lets controllers pass only through cgroups that hold no "
                     "processes: choose a cgroupsPath whose parents hold none") from None

    def available(self, h: Hierarchy) -> set[str]:
        """The controllers a v2 cgroup of this pod has."""
        try:
            return set((self.dirs[h] / "cgroup.controllers").read_text().split())
        except OSError:
            return set()

    def apply(self, limits: Limits) -> None:
        """Write `limits` in every hierarchy that holds one of them. Memory
        the pod uses already is never taken away: v2 would OOM-kill the VM
        to fit a lower memory.max, v1 refuses it part-way."""
        usage = self.memory_usage()
        if limits.memory_bytes is not None and usage is not None and (
                usage > limits.memory_bytes):
            raise CgroupError(
                f"the pod uses {usage >> 20} MiB of memory on the host, more than a limit "
                f"of {limits.memory_bytes >> 20} MiB",
                hint="keep the pod's memory limit at or above what it uses")
        for h, directory in self.dirs.items():
            if h.version == 1:
                writes = v1_writes(h, _within_parent_quota(h, directory, limits))
            else:
                available = self.available(h)
                missing = {c for c in limits.needs() & set(V2_CONTROLLERS)
                           if c not in available and self.layout.with_controller(c) is None}
                if missing:
                    raise CgroupError(
                        f"the cgroup {directory} has no {', '.join(sorted(missing))} "
                        "controller: its limits cannot be applied",
                        hint="enable the controller in its parents' cgroup.subtree_control")
                writes = v2_writes(limits, available)
            for name, value in writes:
                _write(directory / name, value, limit=True)

    def move_charges(self) -> None:
        """On v1, a process moved in brings its memory charges along (a VM
        booted elsewhere, then handed to the pod); v2 cannot."""
        for h, directory in self.dirs.items():
            if h.version == 1 and h.has("memory"):
                with contextlib.suppress(CgroupError):
                    _write(directory / "memory.move_charge_at_immigrate", "3")

    def join(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup."""
        for directory in self.dirs.values():
            _write(directory / "cgroup.procs", str(pid))

    def join_self(self) -> None:
        """Move this process in, remembering where it was."""
        current = process_cgroups()
        for h in self.dirs:
            here = current.get(h.key())
            if here is not None:
                with contextlib.suppress(CgroupError):
                    self._previous[h] = directory_of(h, PurePosixPath(here))
        self.join(os.getpid())

    def leave_self(self) -> None:
        """Move this process back where it was (or to the nearest parent that
        is still there)."""
        for h in self.dirs:
            back = self._previous.get(h, h.mount)
            while back != h.mount and not back.is_dir():
                back = back.parent
            try:
                _write(back / "cgroup.procs", str(os.getpid()))
            except CgroupError:
                # Its old cgroup will not take it back (a v2 parent that now
                # passes controllers down): the root always does, and the
                # pod's cgroup must be left empty to be removed.
                with contextlib.suppress(CgroupError):
                    _write(h.mount / "cgroup.procs", str(os.getpid()))
        self._previous.clear()

    def remove(self) -> list[str]:
        """Remove what was made (children first); returns what could not be
        removed and why."""
        left = remove_dirs(self.created)
        self.created = [p for p in self.created if p.exists()]
        return left

    def oom_kills(self) -> int:
        """How many processes the host's memory limit killed in the cgroup."""
        for h, directory in self.dirs.items():
            name = ("memory.oom_control" if h.version == 1 else "memory.events")
            if h.version == 1 and not h.has("memory"):
                continue
            with contextlib.suppress(OSError, ValueError):
                for line in (directory / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def memory_usage(self) -> int | None:
        for h, directory in self.dirs.items():
            name = ("memory.usage_in_bytes" if h.version == 1 else "memory.current")
            if h.version == 1 and not h.has("memory"):
                continue
            with contextlib.suppress(OSError, ValueError):
                return int((directory / name).read_text())
        return None


def remove_dirs(created: Sequence[Path]) -> list[str]:
    """rmdir each of `created` deepest first, when it is still a cgroup and
    empty; a cgroup whose processes are leaving is given a moment. A parent
    another pod's cgroup still sits in stays (that pod removes it)."""
    problems: list[str] = []
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        if not path.exists():
            continue
        if not on_cgroupfs(path):
            problems.append(f"{path}: not on a cgroup filesystem, left alone")
            continue
        deadline = time.monotonic() + REMOVE_WAIT_SECONDS
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                busy = exc.errno in (errno.EBUSY, errno.ENOTEMPTY)
                if busy and _has_children(path):
                    break  # another pod's cgroup is below it
                if not busy or time.monotonic() > deadline:
                    problems.append(f"{path}: {exc.strerror}")
                    break
                time.sleep(0.05)
    return problems


def _check_unused(directory: Path) -> None:
    """A cgroup pykata did not make is the pod's only if nothing uses it."""
    try:
        procs = (directory / "cgroup.procs").read_text().split()
    except OSError as exc:
        raise CgroupError(f"cannot read {directory / 'cgroup.procs'}: {exc.strerror}") from None
    if procs or _has_children(directory):
        what = f"{len(procs)} process(es)" if procs else "child cgroups"
        raise CgroupError(f"the cgroup {directory} exists already and holds {what}: it "
                          "belongs to something else",
                          hint="give the pod a cgroupsPath of its own")


def _within_parent_quota(h: Hierarchy, directory: Path, limits: Limits) -> Limits:
    """v1 refuses a CFS quota above its parent's (EINVAL): a pod's overhead
    rounding must not fail where the kubelet's pod cgroup is a little lower."""
    if not h.has("cpu") or limits.cpu_quota_us is None:
        return limits
    try:
        quota = int((directory.parent / "cpu.cfs_quota_us").read_text())
        period = int((directory.parent / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return limits
    if quota <= 0 or period <= 0:
        return limits
    allowed = quota * limits.cpu_period_us // period
    if limits.cpu_quota_us <= allowed:
        return limits
    log.info("pod CPU quota %d µs held to its parent's %d µs", limits.cpu_quota_us, allowed)
    return dataclasses.replace(limits, cpu_quota_us=max(allowed, 1000))


def _has_children(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(path))
    return False


def _inherit_cpuset(directory: Path) -> None:
    # A v1 cpuset cgroup starts with no CPUs and no memory nodes, and no
    # process can join it until it has some: it gets its parent's.
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = directory / name
        try:
            if mine.read_text().strip():
                continue
            _write(mine, (directory.parent / name).read_text().strip())
        except OSError as exc:
            raise CgroupError(f"cannot set {mine}: {exc.strerror}") from None


def _write(path: Path, value: str, *, limit: bool = False) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        hint = None
        if limit and exc.errno == errno.EBUSY and path.name.startswith("memory."):
            hint = ("the pod already uses more memory than that on the host: give it a "
                    "larger limit")
        elif limit and exc.errno == errno.EINVAL and path.name.startswith("cpu."):
            hint = "a parent cgroup's CPU quota is lower: raise it, or give the pod less"
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}",
                          hint=hint) from None
    finally:
        os.close(fd)
