"""A pod's sandbox options: from its spec (its network namespace, hostname)
and from `io.katacontainers.config.hypervisor.*` and `...agent.*`
annotations.

Annotations come from whoever writes the pod spec: untrusted input. One is
honoured only when the configuration's `enable_annotations` lists its name
(regular expressions, matched in full); any other is refused with an error
that says which setting would allow it, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from pykata import kernel_params
from pykata.config import Config
from pykata.errors import ConfigError
from pykata.runtime.pod_cgroup import container_request, placement_from_spec
from pykata.runtime.sandbox import SandboxOptions
from pykata.runtime.spec import network_namespace_path, spec_hostname

PREFIX = "io.katacontainers.config."
HYPERVISOR_PREFIX = PREFIX + "hypervisor."
AGENT_PREFIX = PREFIX + "agent."
# strconv.ParseBool's words, which writers of these annotations use.
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def parse_kernel_params(value: str, config: Config) -> str:
    """A pod's extra kernel parameters, each allowed by name (`pykata.kernel_params`)."""
    return kernel_params.check_pod_params(value, config.qemu.valid_kernel_params,
                                          config.source)


def _ignoring_config(parse: Callable[[str], object]) -> Callable[[str, Config], object]:
    return lambda value, _config: parse(value)


_PARSERS: dict[str, tuple[str, Callable[[str, Config], object]]] = {
    "default_vcpus": ("vcpus", _ignoring_config(_int_in(1, 64))),
    "default_memory": ("memory_mib", _ignoring_config(_int_in(64, 1024 * 1024))),
    "kernel_params": ("kernel_params", parse_kernel_params),
}


def _bool(value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("must be true or false")


_AGENT_PARSERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "debug_console_enabled": ("debug_console", _bool),
}


def _agent_option(key: str, value: str, config: Config) -> tuple[str, object]:
    name = key.removeprefix(AGENT_PREFIX)
    if not any(re.fullmatch(pattern, name) for pattern in config.agent.enable_annotations):
        raise ConfigError(
            f"annotation {key} is not allowed by the configuration",
            hint=f"add {name!r} to [agent] enable_annotations in {config.source}")
    if name not in _AGENT_PARSERS:
        raise ConfigError(f"annotation {key} is not supported by pykata",
                          hint=f"supported: {', '.join(sorted(_AGENT_PARSERS))}")
    field, parse = _AGENT_PARSERS[name]
    try:
        return field, parse(value)
    except ValueError as exc:
        raise ConfigError(f"annotation {key}={value!r} is invalid: {exc}") from None


def sandbox_options(annotations: Mapping[str, str], config: Config) -> SandboxOptions:
    """The sandbox settings the annotations ask for, all checked against the allowlist."""
    chosen: dict[str, object] = {}
    for key, value in sorted(annotations.items()):
        if not key.startswith(PREFIX):
            continue
        if key.startswith(AGENT_PREFIX):
            field, chosen_value = _agent_option(key, value, config)
            chosen[field] = chosen_value
            continue
        if not key.startswith(HYPERVISOR_PREFIX):
            raise ConfigError(f"annotation {key} is not supported by pykata",
                              hint=f"only {HYPERVISOR_PREFIX}* and {AGENT_PREFIX}* "
                                   "annotations are")
        name = key.removeprefix(HYPERVISOR_PREFIX)
        allowed = config.qemu.enable_annotations
        if not any(re.fullmatch(pattern, name) for pattern in allowed):
            raise ConfigError(
                f"annotation {key} is not allowed by the configuration",
                hint=f"add {name!r} to [hypervisor.qemu] enable_annotations in {config.source}",
            )
        if name not in _PARSERS:
            raise ConfigError(f"annotation {key} is not supported by pykata",
                              hint=f"supported: {', '.join(sorted(_PARSERS))}")
        field, parse = _PARSERS[name]
        try:
            chosen[field] = parse(value, config)
        except ValueError as exc:
            raise ConfigError(f"annotation {key}={value!r} is invalid: {exc}",
                              hint=getattr(exc, "hint", None)) from None
    return SandboxOptions(**chosen)  # type: ignore[arg-type]


def pod_options(spec: dict[str, Any], config: Config, *, netns: str | None = None,
                systemd_cgroup: bool = False) -> SandboxOptions:
    """The options of the sandbox a pod's first container makes: what its
    annotations ask for (checked against the allowlist), its hostname, the
    network namespace the VM mirrors (`netns` when the front end made one for
    it, else the one the spec names), and its host cgroup (`systemd_cgroup`:
    the engine uses systemd's form of cgroupsPath)."""
    options = sandbox_options(spec.get("annotations") or {}, config)
    placement = (placement_from_spec(spec, systemd=systemd_cgroup)
                 if config.runtime.sandbox_cgroup_only else None)
    return dataclasses.replace(
        options, netns=network_namespace_path(spec) if netns is None else netns,
        hostname=spec_hostname(spec, options.hostname), cgroup=placement,
        cgroup_request=container_request(spec))
