"""The configuration file: defaults, and errors that name the file and the key."""

from __future__ import annotations

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


@pytest.mark.parametrize(("text", "expected"), [
    ("[hypervisor.qemu]\ndefault_memroy = 1\n", "unknown key hypervisor.qemu.default_memroy"),
    ("[hypervisor.qemu]\ndefault_vcpus = true\n", "hypervisor.qemu.default_vcpus must be a int"),
    ("[hypervisor.qemu]\nenable_annotations = \"x\"\n", "must be a list of strings"),
    ("[hypervisor.qemu]\nshared_fs = \"nfs\"\n", "shared_fs = 'nfs' is not one of"),
    ("[agent]\ndial_timeout = -1\n", "dial_timeout must be a positive number"),
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
