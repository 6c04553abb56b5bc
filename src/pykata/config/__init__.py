"""pykata's configuration: the TOML file, validated into frozen objects.

The file in effect is the first of: an explicit path, `$PYKATA_CONFIG`,
`/etc/pykata/configuration.toml`, the default shipped in this package. A file
replaces the default wholesale section by section: keys it leaves out keep
their default values. Unknown keys and wrong types are errors that name the
file and the key, because a typo silently ignored is a setting silently lost.
Run as root, pykata reads no file that another user could change: the
configuration chooses what root runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from pykata import kernel_params, rootonly
from pykata.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/pykata/configuration.toml")
DEFAULT_CONFIG = Path(__file__).with_name("configuration.toml")

_Section = TypeVar("_Section", "QemuConfig", "AgentConfig", "RuntimeConfig", "FactoryConfig")

SHARED_FS_CHOICES = ("auto", "virtio-9p", "virtio-fs")
VIRTIO_FS_CACHE_CHOICES = ("auto", "always", "none")
ACCEL_CHOICES = ("auto", "kvm", "tcg")
MACHINE_CHOICES = ("microvm", "q35")
GUEST_ROOT_CHOICES = ("image", "initrd")


@dataclass(frozen=True)
class QemuConfig:
    path: str = "/usr/bin/qemu-system-x86_64"
    kernel: str = ""
    initrd: str = ""
    image: str = ""
    # What the guest's root filesystem boots from when neither initrd nor
    # image names a file: the cache's read-only image or its initrd.
    guest_root: str = "image"
    # The image as a read-only virtio-blk disk instead of mapped into the
    # guest (DAX, microvm only): each guest then caches what it reads.
    disable_image_nvdimm: bool = False
    machine_type: str = "microvm"
    accel: str = "auto"
    kernel_params: str = ""
    default_vcpus: int = 1
    default_memory: int = 512
    # Under TCG only: MiB of translated guest code QEMU keeps per VM (tb-size).
    # 0 is QEMU's own default, a 1 GiB buffer of which a cold boot fills about
    # 70 MiB, resident for the VM's life. A smaller cache trades start time
    # for memory (README, Configuration). KVM runs no translator.
    tcg_code_cache: int = 0
    shared_fs: str = "auto"
    # virtiofsd for shared_fs = "virtio-fs": "" finds QEMU's (Debian's
    # qemu-system-common) where it is installed; its cache mode.
    virtio_fs_daemon: str = ""
    virtio_fs_cache: str = "auto"
    enable_annotations: tuple[str, ...] = ()
    # The NICs' datapath: vhost-net in the host kernel where /dev/vhost-net
    # exists, unless disabled; QEMU's own otherwise.
    disable_vhost_net: bool = False
    # Kernel parameter names a pod's kernel_params annotation may use besides
    # pykata's own list (pykata.kernel_params).
    valid_kernel_params: tuple[str, ...] = ()

    def validate(self, where: str) -> None:
        for name in self.valid_kernel_params:
            why = kernel_params.check_allowlist_entry(name)
            if why is not None:
                raise ConfigError(
                    f"{where}: valid_kernel_params: {name!r} {why}",
                    hint="list names of parameters the guest kernel takes for itself "
                         "and that change only the pod's own VM (see configuration.toml)")
        _choice(where, "machine_type", self.machine_type, MACHINE_CHOICES)
        _choice(where, "guest_root", self.guest_root, GUEST_ROOT_CHOICES)
        for key in ("path", "kernel", "initrd", "image"):
            value = getattr(self, key)
            if value and not os.path.isabs(value) and (key != "path" or "/" in value):
                raise ConfigError(
                    f"{where}: {key} = {value!r} is not an absolute path",
                    hint="give the file's full path (a relative one would be found from "
                         "wherever the runtime happens to run)")
        if self.image and self.initrd:
            raise ConfigError(
                f"{where}: both initrd = {self.initrd!r} and image = {self.image!r} are set",
                hint="set one of them: the guest boots its root from one file")
        _choice(where, "accel", self.accel, ACCEL_CHOICES)
        _choice(where, "shared_fs", self.shared_fs, SHARED_FS_CHOICES)
        _choice(where, "virtio_fs_cache", self.virtio_fs_cache, VIRTIO_FS_CACHE_CHOICES)
        if self.virtio_fs_daemon and not os.path.isabs(self.virtio_fs_daemon):
            raise ConfigError(f"{where}: virtio_fs_daemon must be an absolute path, not "
                              f"{self.virtio_fs_daemon!r}")
        if not 1 <= self.default_vcpus <= 64:
            raise ConfigError(f"{where}: default_vcpus must be between 1 and 64")
        if not 64 <= self.default_memory <= 1024 * 1024:
            raise ConfigError(f"{where}: default_memory must be between 64 and 1048576 (MiB)")
        if self.tcg_code_cache != 0 and not 16 <= self.tcg_code_cache <= 4096:
            raise ConfigError(
                f"{where}: tcg_code_cache = {self.tcg_code_cache} is out of range",
                hint="give MiB between 16 and 4096, or 0 for QEMU's own default (1024); "
                     "below about 32 a guest spends its time translating its code again")


@dataclass(frozen=True)
class AgentConfig:
    dial_timeout: float = 60.0
    # The debug console (`pykata exec`) for every pod.
    debug_console_enabled: bool = False
    # io.katacontainers.config.agent.<name> annotations a pod may set: the
    # <name>s listed (regular expressions, matched in full).
    enable_annotations: tuple[str, ...] = ()

    def validate(self, where: str) -> None:
        if self.dial_timeout <= 0:
            raise ConfigError(f"{where}: dial_timeout must be a positive number of seconds")


@dataclass(frozen=True)
class RuntimeConfig:
    enable_debug: bool = False
    # MiB of the per-sandbox tmpfs that holds what pykata writes for a sandbox
    # on the host (the writable layer of `pykata run`).
    scratch_size: int = 1024
    # KiB of the guest console kept on the host (the oldest half is dropped).
    console_log_size: int = 1024
    # How a pod's network namespace reaches its VM: "tcfilter" mirrors each
    # interface onto a tap with tc redirects; "none" gives the VM loopback only.
    internetworking_model: str = "tcfilter"
    # Every host process of a pod (its owner, QEMU) runs in the cgroup its
    # spec names, held to the pod's limits plus the overheads below.
    sandbox_cgroup_only: bool = True
    # What the VM itself needs on top of the containers' limits: an idle pod
    # costs about 200 MiB and well under 0.01 CPU on the host.
    sandbox_overhead_memory_mib: int = 256
    sandbox_overhead_millicpus: int = 50
    # Export traces of pod starts, container steps and agent RPCs (the
    # guest's spans included) over OTLP/HTTP to tracing_endpoint.
    enable_tracing: bool = False
    tracing_endpoint: str = "http://127.0.0.1:4318/v1/traces"

    def validate(self, where: str) -> None:
        if not _HTTP_URL.fullmatch(self.tracing_endpoint):
            raise ConfigError(
                f"{where}: tracing_endpoint = {self.tracing_endpoint!r} is not an http(s) URL",
                hint="give the collector's OTLP/HTTP traces URL, for example "
                     "\"http://127.0.0.1:4318/v1/traces\" (Jaeger and the OpenTelemetry "
                     "collector listen on port 4318)")
        if not 0 <= self.sandbox_overhead_memory_mib <= 1024 * 1024:
            raise ConfigError(f"{where}: sandbox_overhead_memory_mib must be between 0 and "
                              "1048576 (MiB)")
        if not 0 <= self.sandbox_overhead_millicpus <= 1024 * 1000:
            raise ConfigError(f"{where}: sandbox_overhead_millicpus must be between 0 and "
                              "1024000 (thousandths of a CPU)")
        if self.internetworking_model not in INTERNETWORKING_MODELS:
            raise ConfigError(
                f"{where}: internetworking_model = {self.internetworking_model!r} is not "
                f"one pykata knows", hint="use \"tcfilter\" or \"none\"")
        if not 16 <= self.console_log_size <= 1024 * 1024:
            raise ConfigError(f"{where}: console_log_size must be between 16 and 1048576 (KiB)")
        if not 16 <= self.scratch_size <= 1024 * 1024:
            raise ConfigError(f"{where}: scratch_size must be between 16 and 1048576 (MiB)")


INTERNETWORKING_MODELS = ("tcfilter", "none")
# An OTLP/HTTP endpoint: http(s), a host, an optional port and path.
_HTTP_URL = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?(/[^\s?#]*)?")


@dataclass(frozen=True)
class FactoryConfig:
    # Start VMs by restoring a template VM saved at agent-ready, its memory
    # shared copy-on-write between pods (see the README on what that shares).
    enable_template: bool = False
    # Where templates live; "" is <run root>/template.
    template_path: str = ""
    # Pod VMs the VM cache (`pykata factory init`) keeps booted for the shim;
    # 0: no cache. The shim asks the cache only when this is above 0.
    vm_cache_number: int = 0
    # The cache's socket; "" is <run root>/factory/cache.sock.
    vm_cache_endpoint: str = ""
    # VM shapes other than the configuration's own that get a template:
    # "VCPUS:MEMORY_MIB", or "VCPUS:MEMORY_MIB:KERNEL_PARAMS" for pods whose
    # kernel_params annotation adds exactly those words. Any other shape
    # boots cold: each shape costs a template VM's boot and memory file.
    template_shapes: tuple[str, ...] = ()
    # Bounds on the templates kept: how many, and MiB of host memory or
    # disk their files take (allocated: memory files are sparse). A build
    # that would pass one evicts the least recently used templates.
    template_max_count: int = 4
    template_max_size: int = 1024

    def validate(self, where: str) -> None:
        for entry in self.template_shapes:
            parse_template_shape(f"{where} template_shapes", entry)
        if not 1 <= self.template_max_count <= 1024:
            raise ConfigError(f"{where}: template_max_count must be between 1 and 1024")
        if not 1 <= self.template_max_size <= 1024 * 1024:
            raise ConfigError(f"{where}: template_max_size must be between 1 and 1048576 (MiB)")
        if not 0 <= self.vm_cache_number <= 256:
            raise ConfigError(f"{where}: vm_cache_number must be between 0 and 256")
        if self.vm_cache_endpoint and not os.path.isabs(self.vm_cache_endpoint):
            raise ConfigError(f"{where}: vm_cache_endpoint must be an absolute path, not "
                              f"{self.vm_cache_endpoint!r}")
        if self.template_path and not os.path.isabs(self.template_path):
            raise ConfigError(f"{where}: template_path must be an absolute path, not "
                              f"{self.template_path!r}")

    def shapes(self) -> tuple[TemplateShape, ...]:
        return tuple(parse_template_shape("template_shapes", e) for e in self.template_shapes)


@dataclass(frozen=True)
class TemplateShape:
    """A VM shape the operator gives a template ([factory] template_shapes)."""

    vcpus: int
    memory_mib: int
    kernel_params: tuple[str, ...] = ()  # the pod's own, after the configuration's


def parse_template_shape(where: str, entry: str) -> TemplateShape:
    """One `template_shapes` entry: "VCPUS:MEMORY_MIB[:KERNEL_PARAMS]"."""
    vcpus, _, rest = entry.partition(":")
    memory, _, params = rest.partition(":")
    try:
        shape = TemplateShape(int(vcpus), int(memory), tuple(params.split()))
    except ValueError:
        raise ConfigError(
            f"{where}: {entry!r} is not a VM shape",
            hint='write "VCPUS:MEMORY_MIB" (e.g. "2:1024"), or '
                 '"VCPUS:MEMORY_MIB:KERNEL_PARAMS" for a pod\'s extra kernel parameters'
        ) from None
    if not 1 <= shape.vcpus <= 64 or not 64 <= shape.memory_mib <= 1024 * 1024:
        raise ConfigError(f"{where}: {entry!r} has vCPUs outside 1-64 or memory outside "
                          "64-1048576 MiB")
    return shape


@dataclass(frozen=True)
class Config:
    qemu: QemuConfig = field(default_factory=QemuConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    source: str = str(DEFAULT_CONFIG)

    def to_dict(self) -> dict[str, Any]:
        """The configuration in the file's own layout (as `pykata env` shows it)."""
        return {
            "hypervisor": {"qemu": _plain(dataclasses.asdict(self.qemu))},
            "agent": _plain(dataclasses.asdict(self.agent)),
            "runtime": _plain(dataclasses.asdict(self.runtime)),
            "factory": _plain(dataclasses.asdict(self.factory)),
        }


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The configuration file that `load` reads."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PYKATA_CONFIG")
    if env:
        return Path(env)
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return DEFAULT_CONFIG


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming file and key.
    As root, first refuse a file another user could change (`check_owner`)."""
    path = config_path(explicit)
    if os.geteuid() == 0:
        check_owner(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(data, str(path))


def check_owner(path: Path) -> None:
    """Refuse a configuration file that a user other than root owns or can
    change, directly or through a directory above it (`pykata.rootonly`), as
    sudo and sshd refuse theirs: it names the QEMU that root executes, so its
    writer would be root."""
    try:
        problem = rootonly.path_problem(path)
    except FileNotFoundError:
        return  # reading it says so, naming the file
    except OSError as exc:
        raise ConfigError(f"cannot check configuration file {path}: {exc.strerror}") from exc
    if problem is not None:
        raise ConfigError(
            f"configuration file {path} can be changed by a user other than root, who "
            f"would then choose what pykata runs as root: {problem}",
            hint=f"chown root {problem.path} && chmod go-w {problem.path}, or keep the "
                 f"configuration where only root can write ({SYSTEM_CONFIG})")


def parse(data: dict[str, Any], source: str) -> Config:
    """Validate an already-decoded configuration table."""
    _no_unknown(source, "", data, {"hypervisor", "agent", "runtime", "factory"})
    hypervisor = _table(source, "hypervisor", data.get("hypervisor", {}))
    _no_unknown(source, "hypervisor.", hypervisor, {"qemu"})
    qemu = _section(QemuConfig, source, "hypervisor.qemu", hypervisor.get("qemu", {}))
    agent = _section(AgentConfig, source, "agent", data.get("agent", {}))
    runtime = _section(RuntimeConfig, source, "runtime", data.get("runtime", {}))
    factory = _section(FactoryConfig, source, "factory", data.get("factory", {}))
    return Config(qemu=qemu, agent=agent, runtime=runtime, factory=factory, source=source)


def _section(cls: type[_Section], source: str, name: str, raw: object) -> _Section:
    table = _table(source, name, raw)
    known = {f.name: f for f in fields(cls)}
    _no_unknown(source, f"{name}.", table, set(known))
    values: dict[str, Any] = {}
    for key, value in table.items():
        values[key] = _coerce(source, f"{name}.{key}", known[key].type, value)
    obj = cls(**values)
    obj.validate(f"{source}: [{name}]")
    return obj


def _coerce(source: str, key: str, annotation: object, value: object) -> object:
    expected = str(annotation)
    if expected == "bool":
        ok = isinstance(value, bool)
    elif expected == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif expected == "str":
        ok = isinstance(value, str)
    elif expected == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value  # type: ignore[arg-type]
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"unsupported configuration type {expected} for {key}")
    if not ok:
        wanted = {"tuple[str, ...]": "list of strings", "float": "number"}.get(expected, expected)
        raise ConfigError(
            f"{source}: {key} must be a {wanted}, not {type(value).__name__} {value!r}"
        )
    return value


def _table(source: str, name: str, raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return raw


def _no_unknown(source: str, prefix: str, table: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}",
            hint=f"known keys here: {', '.join(sorted(known))}",
        )


def _choice(where: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(choices)}")


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
