"""The runtime options containerd sends with a task (`CreateTaskRequest.options`).

containerd's CRI plugin passes a runtime handler's `options` table as a
`runtimeoptions.v1.Options`; its ConfigPath names the pykata configuration
for that handler's pods, so one node can offer several pykata handlers
(say, different VM sizes) through one shim binary.
"""

from __future__ import annotations

import logging

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from pykata import config as config_mod
from pykata.errors import ConfigError
from pykata.protocols import runtime_options_pb2

log = logging.getLogger(__name__)

RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


def pod_config(options: any_pb2.Any, current: config_mod.Config) -> config_mod.Config:
    """The configuration for the pod: the one ConfigPath names, else `current`
    (PYKATA_CONFIG or the default file). Options of another type (runc's, a
    plain `ctr run`'s none) leave it as it is."""
    if not options.type_url:
        return current
    if options.type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
        log.debug("runtime options of type %s ignored", options.type_url)
        return current
    parsed = runtime_options_pb2.Options()
    try:
        parsed.ParseFromString(options.value)
    except DecodeError:
        raise ConfigError("the runtime handler's options could not be decoded",
                          hint="check the handler's options table in containerd's "
                               "configuration") from None
    if parsed.config_body and not parsed.config_path:
        raise ConfigError("the runtime handler's options give ConfigBody, which pykata does "
                          "not read", hint="set ConfigPath to a pykata configuration file")
    if not parsed.config_path or parsed.config_path == current.source:
        return current
    if not parsed.config_path.startswith("/"):
        raise ConfigError(f"the runtime handler's ConfigPath {parsed.config_path!r} is not "
                          "an absolute path", hint="give the configuration file's full path")
    log.info("configuration from the runtime handler's ConfigPath: %s", parsed.config_path)
    try:
        return config_mod.load(parsed.config_path)
    except ConfigError as exc:
        raise ConfigError(f"runtime handler option ConfigPath: {exc.message}",
                          hint=exc.hint or "fix ConfigPath in containerd's configuration"
                          ) from None
