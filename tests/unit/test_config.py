"""The configuration file: defaults, and errors that name the file and the key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from pykata import config
from pykata.cli.env_cmd import to_toml
from pykata.errors import ConfigError


def test_packaged_default_loads() -> None:
    """The shipped configuration is valid and matches the documented defaults."""
    cfg = config.load(config.DEFAULT_CONFIG)
    assert cfg.qemu.machine_type == "microvm" and cfg.qemu.default_memory == 512
    assert cfg.agent.dial_timeout == 60.0 and cfg.qemu.enable_annotations == ()
    assert cfg.qemu.tcg_code_cache == config.QemuConfig().tcg_code_cache == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("[hypervisor.qemu]\ndefault_memroy = 1\n", "unknown key hypervisor.qemu.default_memroy"),
    ("[hypervisor.qemu]\ndefault_vcpus = true\n", "hypervisor.qemu.default_vcpus must be a int"),
    ("[hypervisor.qemu]\nenable_annotations = \"x\"\n", "must be a list of strings"),
    ("[hypervisor.qemu]\nshared_fs = \"nfs\"\n", "shared_fs = 'nfs' is not one of"),
    ("[agent]\ndial_timeout = -1\n", "dial_timeout must be a positive number"),
    ("[hypervisor.qemu]\ntcg_code_cache = 4\n", "tcg_code_cache = 4 is out of range"),
    ("[runtime]\nenable_debug = 1\n", "runtime.enable_debug must be a bool"),
    ("[surprise]\n", "unknown key surprise"),
    ("not toml [", "not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    """Each mistake is reported with the file's path and what is wrong."""
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    """An explicit configuration path that does not exist is an error naming it."""
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_integer_accepted_for_seconds() -> None:
    """A whole number is a valid number of seconds."""
    assert config.parse({"agent": {"dial_timeout": 5}}, "x").agent.dial_timeout == 5.0


def test_env_output_reads_back_to_the_same_configuration() -> None:
    """`pykata env` prints TOML that loads back to an equal configuration."""
    cfg = config.parse({"hypervisor": {"qemu": {"enable_annotations": ["default_.*"],
                                                "kernel_params": "a=\"b\""}}}, "x")
    again = config.parse(tomllib.loads(to_toml(cfg.to_dict())), "x")
    assert again == cfg


NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to nobody needs root")


@needs_root
@pytest.mark.parametrize("how", ["owned by nobody", "group nobody's, writable",
                                 "writable by all", "in a directory nobody owns",
                                 "in a world-writable directory", "through nobody's link"])
def test_root_refuses_a_configuration_another_user_can_change(tmp_path: Path, how: str) -> None:
    """As root (as the shim, pykata-oci's monitor and the CLI run), a
    configuration another user owns or can write, itself or through a
    directory or link on the way, is refused naming the entry and the fix:
    it names the QEMU binary root executes."""
    directory = tmp_path / "etc"
    directory.mkdir()
    path = directory / "configuration.toml"
    path.write_text("[runtime]\nenable_debug = true\n")
    loaded, culprit = path, path
    if how == "owned by nobody":
        os.chown(path, NOBODY, NOBODY)
    elif how == "group nobody's, writable":
        os.chown(path, 0, NOBODY)
        path.chmod(0o664)
    elif how == "writable by all":
        path.chmod(0o666)
    elif how == "in a directory nobody owns":
        os.chown(directory, NOBODY, NOBODY)
        culprit = directory
    elif how == "in a world-writable directory":
        directory.chmod(0o777)
        culprit = directory
    else:
        (tmp_path / "nobodys").mkdir()
        loaded = tmp_path / "nobodys" / "link.toml"
        loaded.symlink_to(path)
        os.chown(loaded.parent, NOBODY, NOBODY)
        culprit = loaded.parent
    with pytest.raises(ConfigError) as error:
        config.load(loaded)
    message = str(error.value)
    assert f"configuration file {loaded} can be changed by a user other than root" in message
    assert f"{culprit} is " in message and f"chown root {culprit}" in message


@needs_root
def test_root_accepts_a_configuration_only_root_can_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root's file in root's directories passes, also below a root-owned sticky
    directory (like /tmp, where its entry cannot be swapped) and with root's
    group writing it (as sudo allows); the packaged default passes; a user
    other than root may read a file of their own."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = sticky / "configuration.toml"
    path.write_text("[runtime]\nenable_debug = true\n")
    os.chown(path, 0, 0)
    path.chmod(0o664)
    assert config.load(path).runtime.enable_debug
    assert config.load(config.DEFAULT_CONFIG).source == str(config.DEFAULT_CONFIG)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        config.load(path)
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    assert config.load(path).runtime.enable_debug


@needs_root
def test_every_way_to_name_a_configuration_is_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$PYKATA_CONFIG (the shim, pykata-oci, the monitor) and the runtime
    handler's ConfigPath (the shim) end in the same check as --config."""
    from google.protobuf import any_pb2

    from pykata.protocols import runtime_options_pb2
    from pykata.shim.options import RUNTIME_OPTIONS_TYPE, pod_config

    path = tmp_path / "nobodys.toml"
    path.write_text("")
    os.chown(path, NOBODY, NOBODY)
    monkeypatch.setenv("PYKATA_CONFIG", str(path))
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        config.load()
    options = any_pb2.Any(type_url=f"types.containerd.io/{RUNTIME_OPTIONS_TYPE}",
                          value=runtime_options_pb2.Options(
                              config_path=str(path)).SerializeToString())
    with pytest.raises(ConfigError, match=r"ConfigPath.*owned by uid 65534"):
        pod_config(options, config.Config())


@pytest.mark.parametrize(("name", "expected"), [
    ("init", "never a pod's to set: it chooses the guest's init"),
    ("rd-init", None), ("panic", "never a pod's"), ("console", "never a pod's"),
    ("reboot", "never a pod's"), ("--", "never a pod's"),
    ("pykata.debug", "pykata's own"), ("sysctl.kernel.panic", "guest sysctl"),
    ("sysctl/kernel/panic", "guest sysctl"),
    ("PYKATA_STAGE", "as an environment variable"), ("PYTHONINSPECT", "environment variable"),
    ("nosmt=force", "list the name only"), ("no smt", "not a kernel parameter name"),
    ("", "not a kernel parameter name"),
    ("nosmt", None), ("printk.synchronous", None),
])
def test_valid_kernel_params_are_names_pykata_may_let_pods_set(
        name: str, expected: str | None) -> None:
    """The operator's additions to the pods' kernel parameter allowlist are
    checked at load: what starts init, keeps panics fatal, pykata's own,
    sysctls and environment-shaped names stay refused whatever it says."""
    data = {"hypervisor": {"qemu": {"valid_kernel_params": [name]}}}
    if expected is None:
        assert config.parse(data, "x.toml").qemu.valid_kernel_params == (name,)
        return
    with pytest.raises(ConfigError) as error:
        config.parse(data, "x.toml")
    assert f"x.toml: [hypervisor.qemu]: valid_kernel_params: {name!r}" in str(error.value)
    assert expected in str(error.value)
