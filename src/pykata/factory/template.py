"""VM templates: a VM booted once to agent-ready and saved, that new VMs are
restored from.

    <root>/                 0700 (default <run root>/template)
    <root>/<key>/           one template per VM shape, 0700
        memory              the template's guest RAM: clones map it private
        state               its device state (a QEMU migration stream)
        template.json       what it was made from, and the agent channel's
                            next ttRPC stream id
        console.log, qemu.stderr
    <root>/<key>.lock       the key's lock: held exclusively while the
                            template is built or removed, shared while a
                            VM is restored from it

The key is a digest of everything that makes a VM's saved state fit another
VM: QEMU, kernel and guest root (the initrd or the root image; path and file
identity, so a rebuilt asset makes a new key), machine type, accelerator,
vCPUs, memory, kernel command line and the device list. A VM whose shape has
no template gets one built, when the configuration gives its shape one
(`shape_refusal`); a template whose assets changed is never found again and is
removed at the next build.

Templates are bounded in number and allocated bytes ([factory]
template_max_count, template_max_size): a build that would pass a bound
evicts the least recently used templates first (a template's directory
mtime is its last use: each restore sets it). Removing a template takes its
lock exclusively without waiting, so a build or a restore in progress keeps
its template; and whoever removes a lock file holds it, so every taker checks,
once it holds a lock, that the path still names the file it locked.

A template is saved before the guest mounts its shared directory (QEMU
refuses to migrate a mounted 9p export), so every clone mounts its own
sandbox's export at CreateSandbox. A template has as many NICs as its
shape's VMs, on no tap and with MACs of its own (`template_mac`): a clone's
QEMU puts them on the pod's taps, and the sandbox gives each guest link the
pod interface's MAC. Clones resume with the template's random
state and clock: the sandbox reseeds and sets both before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.config import Config
from pykata.errors import AgentError, HostError, HypervisorError, PykataError
from pykata.hypervisor.base import NetworkInterface
from pykata.hypervisor.qemu import QemuVM, VmConfig
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.paths import private_dir, run_root
from pykata.runtime.pod_network import template_mac

log = logging.getLogger(__name__)

# 2: templates and clones have no free-page-reporting balloon.
FORMAT = 2
META = "template.json"
_KEY = re.compile(r"[0-9a-f]{24}")
_SAVE_SECONDS = 60.0


_MIB = 1024 * 1024
# How long a restore waits for its template's key to be free (an eviction
# or a removal holds it for as long as deleting a few files takes).
_IN_USE_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.05
# How long a template build waits for its agent's warm-up (see _until_warm).
_WARM_SECONDS = 10.0
# A lock file that keeps being replaced under its takers: give up, not spin.
_LOCK_TRIES = 100
# How long `destroy` waits for templates being built or restored from: a
# build takes a few seconds, up to a minute on a loaded host without KVM
# (deploy/pykata-factory.service gives its stop 90 s).
DESTROY_WAIT_SECONDS = 60.0


class TemplateBusy(PykataError):
    """Another process is building this template right now."""


class TemplateCapReached(PykataError):
    """A new template would pass [factory] template_max_count or
    template_max_size, and no template can be evicted to make room."""


@dataclass(frozen=True)
class Limits:
    """The bounds on the templates under a root, and the file that sets them
    (errors name it)."""

    max_count: int
    max_bytes: int
    source: str = "the configuration"


def limits(config: Config) -> Limits:
    return Limits(config.factory.template_max_count,
                  config.factory.template_max_size * _MIB, config.source)


@dataclass(frozen=True)
class Template:
    directory: Path
    key: str
    next_stream_id: int
    created: float

    @property
    def memory(self) -> Path:
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        return self.directory / "state"


def template_root(config: Config) -> Path:
    return Path(config.factory.template_path or run_root() / "template")


def unclonable(vm: VmConfig) -> str:
    """Why a template cannot stand in for this VM ("" when one can)."""
    if vm.vsock_cid:
        return "its agent channel is vsock (a clone would need its own context id)"
    if vm.shared_dir is None:
        return "it has no shared directory"
    if vm.uses_virtio_fs:
        # runtime.fs_choice gives a configuration with templates 9p; this
        # guards a VmConfig made some other way.
        return "its shared filesystem is virtio-fs, which QEMU 7.2 cannot save"
    return ""


def shape_refusal(config: Config, vm: VmConfig) -> str:
    """Why the configuration gives `vm`'s shape no template ("" when it
    does). Each shape costs a template VM's boot and its memory file, and a
    pod's annotations choose its vCPUs, memory and extra kernel parameters:
    only the configuration's own shape, and those it lists in [factory]
    template_shapes, get one."""
    q = config.qemu
    own = q.kernel_params.split()
    words = vm.kernel_params.split()
    # A pod's kernel parameters come after the configuration's own.
    extra = tuple(words[len(own):]) if words[:len(own)] == own else tuple(words)
    allowed = {(q.default_vcpus, q.default_memory, ())} | {
        (s.vcpus, s.memory_mib, s.kernel_params) for s in config.factory.shapes()}
    if words[:len(own)] == own and (vm.vcpus, vm.memory_mib, extra) in allowed:
        return ""
    shape = f"{vm.vcpus}:{vm.memory_mib}" + (f":{' '.join(extra)}" if extra else "")
    return (f"its VM shape {shape!r} (vCPUs:MiB[:kernel parameters]) is not the "
            f"configuration's own and [factory] template_shapes in {config.source} does "
            "not list it (add it there to give it a template)")


def _file_id(path: str | Path) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), "missing"]
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def identity(vm: VmConfig) -> dict[str, Any]:
    """What a VM's saved state depends on."""
    return {
        "format": FORMAT,
        "qemu": _file_id(vm.qemu_path),
        "kernel": _file_id(vm.kernel),
        # The initrd or the root image, whichever the guest's root is from
        # (the command line says which).
        "initrd": _file_id(vm.guest_root),
        "machine_type": vm.machine_type,
        "accel": vm.accel,
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "cmdline": vm.kernel_cmdline(),
        # The devices a template and its clones have: RAM in a file (so no
        # free page reporting, see VmConfig.devices).
        "devices": [type(d).__name__ for d in dataclasses.replace(
            vm, memory_path=Path("/template")).devices()],
    }


def template_key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def find(root: Path, vm: VmConfig) -> tuple[Template | None, str]:
    """The template for `vm`'s shape, or None and why there is none."""
    ident = identity(vm)
    key = template_key(ident)
    directory = root / key
    for path in (root, directory):
        untrusted = _not_private(path)
        if untrusted:
            return None, untrusted
    try:
        meta = json.loads((directory / META).read_text())
    except FileNotFoundError:
        return None, f"no VM template for this VM's shape in {root}"
    except (OSError, ValueError) as exc:
        return None, f"the VM template in {directory} is unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("identity") != ident:
        return None, f"the VM template in {directory} was made for other settings"
    stream = meta.get("next_stream_id")
    if not isinstance(stream, int) or stream < 1 or stream % 2 == 0:
        return None, f"the VM template in {directory} has no valid stream id"
    template = Template(directory, key, stream, float(meta.get("created", 0)))
    for part in (template.memory, template.state):
        if not part.is_file():
            return None, f"the VM template in {directory} lacks {part.name}"
    return template, ""


def _not_private(path: Path) -> str:
    """Why `path` cannot hold a template pykata trusts ("" when it can): a
    template's state is parsed by every clone's QEMU, so only a directory of
    ours that nobody else can write may hold one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"no VM template for this VM's shape in {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return (f"{path} is not a directory of uid {os.geteuid()} that only it can write: "
                "its templates are not used")
    return ""


def _lock_path(root: Path, key: str) -> Path:
    return root / f"{key}.lock"


def _take_lock(root: Path, key: str, operation: int) -> int:
    """The descriptor of `key`'s lock file, flocked with `operation`.

    Whoever removes a template unlinks its lock file while holding it: a
    taker that was waiting then holds a lock nobody else can find, and two
    builders could each hold "the" lock. So once the flock is ours, the path
    must still name the file we locked; if not, lock what it names now.
    Raises BlockingIOError when `operation` has LOCK_NB and the lock is held."""
    path = _lock_path(root, key)
    for _ in range(_LOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, operation)
            held = os.fstat(fd)
            try:
                named = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)
    raise BlockingIOError(f"the lock file {path} kept being replaced")


async def build(root: Path, vm: VmConfig, dial_timeout: float, *, bounds: Limits) -> Template:
    """Boot a template VM for `vm`'s shape to agent-ready and save it,
    evicting least recently used templates to stay within `bounds`.
    Raises TemplateBusy while another process builds the same one, and
    TemplateCapReached when the bounds leave no room for it."""
    ident = identity(vm)
    key = template_key(ident)
    private_dir(root)
    try:
        lock_fd = _take_lock(root, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TemplateBusy(f"the VM template {key} is being built by another "
                           "process") from None
    except OSError as exc:
        raise HostError(f"cannot lock the VM template {key} in {root}: {exc.strerror}") from exc
    try:
        found, _ = find(root, vm)
        if found is not None:  # built while we waited for the lock
            return found
        prune(root)
        _make_room(root, key, bounds)
        work = root / f"{key}.new"
        shutil.rmtree(work, ignore_errors=True)  # a build that died part-way
        final = root / key
        try:
            template = await _build_in(work, key, ident, vm, dial_timeout)
            _remove_files(root, key)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _mark_used(final)
        _fit(root, key, bounds)
        return dataclasses.replace(template, directory=final)
    finally:
        os.close(lock_fd)


@contextlib.asynccontextmanager
async def in_use(template: Template) -> AsyncIterator[None]:
    """Keep `template` from being evicted or removed while a VM is restored
    from it (a shared lock on its key: QEMU maps its memory and reads its
    state meanwhile), and record the use for least-recently-used eviction.
    Raises HypervisorError when it went (or changed) since `find`."""
    root = template.directory.parent
    deadline = time.monotonic() + _IN_USE_WAIT_SECONDS
    while True:
        try:
            fd = _take_lock(root, template.key, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise HypervisorError(
                    f"the VM template {template.key} stayed locked (being rebuilt or "
                    f"removed) for {_IN_USE_WAIT_SECONDS:g} s") from None
            await asyncio.sleep(_POLL_SECONDS)
        except OSError as exc:
            raise HypervisorError(f"cannot lock the VM template {template.key}: "
                                  f"{exc.strerror}") from exc
    try:
        if not _still(template):
            raise HypervisorError(f"the VM template {template.key} was removed or rebuilt "
                                  "after it was found")
        _mark_used(template.directory)
        yield
    finally:
        os.close(fd)


def _mark_used(directory: Path) -> None:
    """Record a template's last use (its directory's mtime), to the
    nanosecond: the kernel's own stamp is coarser than starts can be apart."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(directory, ns=(now, now), follow_symlinks=False)


def _still(template: Template) -> bool:
    """Whether `template`'s files are still the ones `find` found."""
    try:
        meta = json.loads((template.directory / META).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("next_stream_id") == template.next_stream_id
            and meta.get("created", 0) == template.created
            and template.memory.is_file() and template.state.is_file())


async def _until_warm(agent: AgentClient, bound: float = _WARM_SECONDS) -> None:
    """Wait until the template's agent has imported what it defers past its
    first answer (its boot profile's agent_warm), for at most `bound`
    seconds: saved warm, no clone spends its start importing them. Past the
    bound the template is saved as it is (each clone then finishes them)."""
    deadline = time.monotonic() + bound
    while "agent_warm" not in await agent.boot_profile():
        if time.monotonic() >= deadline:
            log.info("the template VM's agent did not finish its warm-up in %g s: "
                     "saved without it", bound)
            return
        await asyncio.sleep(_POLL_SECONDS)


async def _build_in(work: Path, key: str, ident: dict[str, Any], vm: VmConfig,
                    dial_timeout: float) -> Template:
    private_dir(work)
    (work / "share").mkdir(mode=0o700)
    # As many NICs as the VM has, on no tap, with the template's MACs.
    nics = tuple(NetworkInterface(-1, template_mac(i), nic.mtu)
                 for i, nic in enumerate(vm.network))
    template_vm = QemuVM(dataclasses.replace(
        vm, name=f"template-{key}", run_dir=work, shared_dir=work / "share",
        memory_path=work / "memory", memory_shared=True, incoming=False, network=nics))
    started = time.monotonic()
    agent: AgentClient | None = None
    try:
        await template_vm.start()
        assert template_vm.agent_socket is not None
        agent = await AgentClient.over_socket(template_vm.agent_socket)
        try:
            await asyncio.wait_for(agent.check(dial_timeout), dial_timeout + 5)
        except (AgentError, TimeoutError) as exc:
            raise HypervisorError(
                f"the template VM's agent did not answer: {exc}\n"
                f"{template_vm.failure_report()}") from exc
        await _until_warm(agent)
        next_stream_id = agent.next_stream_id
        # Saved with the agent channel still connected: the guest never sees
        # its host side go away, and resumes in every clone mid-read.
        await template_vm.save_state(work / "state", _SAVE_SECONDS)
    finally:
        if agent is not None:
            await agent.close()
        await template_vm.stop()
    created = time.time()
    meta = {"identity": ident, "next_stream_id": next_stream_id, "created": created,
            "build_seconds": round(time.monotonic() - started, 3)}
    tmp = work / f"{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.rename(tmp, work / META)
    log.info("VM template %s built in %.2f s", key, meta["build_seconds"])
    return Template(work, key, next_stream_id, created)


def _stale(meta: Any) -> bool:
    """Whether a template's QEMU, kernel or guest root has changed since it was made."""
    if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict):
        return True
    ident = meta["identity"]
    if ident.get("format") != FORMAT:
        return True
    for part in ("qemu", "kernel", "initrd"):
        recorded = ident.get(part)
        if not isinstance(recorded, list) or not recorded:
            return True
        if _file_id(recorded[0]) != recorded:
            return True
    return False


@dataclass(frozen=True)
class TemplateInfo:
    key: str
    directory: Path
    created: float
    memory_bytes: int  # of the memory file, allocated (it is sparse)
    stale: bool
    shape: dict[str, Any]
    size_bytes: int = 0  # of all its files, allocated
    last_used_ns: int = 0  # when a VM was last restored from it (or it was made)


def list_templates(root: Path) -> list[TemplateInfo]:
    out: list[TemplateInfo] = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if not _KEY.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            meta = json.loads((entry / META).read_text())
        except (OSError, ValueError):
            meta = None
        try:
            used = os.stat(entry / "memory").st_blocks * 512
        except OSError:
            used = 0
        try:
            last_used = os.lstat(entry).st_mtime_ns
        except OSError:
            continue  # removed meanwhile
        ident = meta.get("identity", {}) if isinstance(meta, dict) else {}
        shape = {k: ident.get(k) for k in ("vcpus", "memory_mib", "machine_type", "accel")}
        out.append(TemplateInfo(entry.name, entry, float(meta.get("created", 0))
                                if isinstance(meta, dict) else 0.0, used, _stale(meta), shape,
                                _allocated(entry), last_used))
    return out


def _allocated(directory: Path) -> int:
    """Bytes the files under `directory` take on the host (not their sizes:
    a template's memory file is sparse)."""
    total = 0
    for parent, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def _remove_files(root: Path, key: str) -> None:
    """Remove `key`'s template, its record first (so `find` stops finding
    it at once). Only for a holder of the key's lock."""
    directory = root / key
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        directory.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        (directory / META).unlink()
    shutil.rmtree(directory, ignore_errors=True)


def _evict(root: Path, key: str) -> bool:
    """Remove `key`'s template and lock file, unless a build, a restore or
    another removal holds its lock (False then)."""
    try:
        fd = _take_lock(root, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        log.warning("cannot lock the VM template %s to remove it: %s", key, exc.strerror)
        return False
    try:
        _discard(root, key)
    finally:
        os.close(fd)
    return True


def _eviction_order(infos: list[TemplateInfo]) -> list[TemplateInfo]:
    """Stale templates first (no VM can use them), then the least recently used."""
    return sorted(infos, key=lambda i: (not i.stale, i.last_used_ns, i.key))


def _evict_one(root: Path, infos: list[TemplateInfo]) -> bool:
    """Evict the first template of `infos` in eviction order that nobody
    holds, and drop it from `infos`; False when every one is held."""
    for info in _eviction_order(infos):
        if _evict(root, info.key):
            log.info("VM template %s evicted (used least recently; %d MiB)",
                     info.key, info.size_bytes // _MIB)
            infos.remove(info)
            return True
    return False


def _bound_passed(others: list[TemplateInfo], new_bytes: int, bounds: Limits) -> str:
    """The bound that `others` and a new template of `new_bytes` would pass
    ("" when they fit), as the configuration key that sets it."""
    if len(others) + 1 > bounds.max_count:
        return f"template_max_count = {bounds.max_count}"
    if sum(i.size_bytes for i in others) + new_bytes > bounds.max_bytes:
        return f"template_max_size = {bounds.max_bytes // _MIB} (MiB)"
    return ""


def _no_room(root: Path, others: list[TemplateInfo], passed: str,
             bounds: Limits) -> TemplateCapReached:
    used = sum(i.size_bytes for i in others)
    key = passed.partition(" ")[0]
    return TemplateCapReached(
        f"no room for its VM template: with the {len(others)} in {root} "
        f"({-(-used // _MIB)} MiB), each being restored from or built right now, it "
        f"would pass [factory] {passed}", hint=f"raise {key} in {bounds.source}")


def _make_room(root: Path, key: str, bounds: Limits) -> None:
    """Before `key`'s build: evict until one more template fits the count
    and the others leave some room under the byte bound (what the new one
    takes is known once it is built: `_fit`)."""
    others = [i for i in list_templates(root) if i.key != key]
    # One byte: what the new template takes at the least.
    while passed := _bound_passed(others, 1, bounds):
        if not _evict_one(root, others):
            raise _no_room(root, others, passed, bounds)


def _fit(root: Path, key: str, bounds: Limits) -> None:
    """After `key`'s build (its lock held): evict the least recently used
    others until all fit the bounds. The new template goes instead when it
    alone is larger than the byte bound, or when the others cannot go."""
    infos = list_templates(root)
    others = [i for i in infos if i.key != key]
    size = sum(i.size_bytes for i in infos if i.key == key)
    if size > bounds.max_bytes:
        _discard(root, key)
        raise TemplateCapReached(
            f"its VM template took {-(-size // _MIB)} MiB, more than [factory] "
            f"template_max_size = {bounds.max_bytes // _MIB} (MiB): it was not kept",
            hint=f"raise template_max_size to at least {-(-size // _MIB)} in {bounds.source}")
    while passed := _bound_passed(others, size, bounds):
        if not _evict_one(root, others):
            _discard(root, key)
            raise _no_room(root, others, passed, bounds)


def _discard(root: Path, key: str) -> None:
    """Remove `key`'s template and its lock file, for the lock's holder
    (every taker checks that the path still names what it locked)."""
    _remove_files(root, key)
    _lock_path(root, key).unlink(missing_ok=True)


def prune(root: Path) -> list[str]:
    """Remove templates no VM can use again (their assets changed), except
    those a build or restore holds right now."""
    return [info.key for info in list_templates(root)
            if info.stale and _evict(root, info.key)]


def remove_abandoned(root: Path) -> list[str]:
    """Remove the half-built templates of builders that died (`<key>.new`
    whose lock nobody holds)."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for work in sorted(root.glob("*.new")):
        key = work.name.removesuffix(".new")
        if not _KEY.fullmatch(key):
            continue
        try:
            fd = _take_lock(root, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # still being built
        except FileNotFoundError:  # `root` went: a destroy
            break
        try:
            shutil.rmtree(work, ignore_errors=True)
            if not (root / key).exists():
                _lock_path(root, key).unlink(missing_ok=True)
            removed.append(key)
        finally:
            os.close(fd)
    return removed


@dataclass(frozen=True)
class Destroyed:
    removed: list[str]  # the keys of the templates removed
    busy: list[str]  # keys still built or used when the wait ran out: left in place


def destroy(root: Path, wait: float | None = None,
            waiting: Callable[[list[str]], None] | None = None) -> Destroyed:
    """Remove every template under `root` (and `root` once it is empty).

    A key whose lock is held (a builder mid-build, a VM being restored) is
    waited for, up to `wait` seconds (DESTROY_WAIT_SECONDS by default;
    `waiting` is told which keys, once), then left in place: removing a live
    builder's lock and work directory would let a second builder take a
    fresh lock, and the first one's files would land in the second's
    template."""
    removed: list[str] = []
    pending = _keys_under(root)
    deadline = time.monotonic() + (DESTROY_WAIT_SECONDS if wait is None else wait)
    told = False
    while True:
        busy = []
        for key in pending:
            outcome = _destroy_key(root, key)
            if outcome is None:
                busy.append(key)
            elif outcome:
                removed.append(key)
        if not busy or time.monotonic() >= deadline:
            break
        if waiting is not None and not told:
            waiting(busy)
            told = True
        time.sleep(_POLL_SECONDS * 2)
        pending = busy
    with contextlib.suppress(OSError):
        root.rmdir()
    return Destroyed(sorted(removed), busy)


def _keys_under(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    keys = {entry.name.removesuffix(".lock").removesuffix(".new") for entry in root.iterdir()}
    return sorted(k for k in keys if _KEY.fullmatch(k))


def _destroy_key(root: Path, key: str) -> bool | None:
    """Remove `key`'s template, work directory and lock: whether it had a
    template, or None when its lock is held."""
    try:
        fd = _take_lock(root, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except FileNotFoundError:  # `root` went: another destroy
        return False
    try:
        had = (root / key).is_dir() and not (root / key).is_symlink()
        shutil.rmtree(root / f"{key}.new", ignore_errors=True)
        _discard(root, key)
    finally:
        os.close(fd)
    return had
