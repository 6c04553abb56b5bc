"""Which network namespace each front end hands the sandbox, the runtime
handler's ConfigPath, and the configuration's internetworking_model."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2

from pykata import config as config_mod
from pykata.errors import ConfigError
from pykata.oci.monitor import container_netns
from pykata.protocols import runtime_options_pb2
from pykata.runtime.spec import network_namespace_path
from pykata.runtime.state import SandboxState, read_state, write_state
from pykata.shim.options import pod_config


def _spec(*namespaces: dict[str, str]) -> dict[str, object]:
    return {"linux": {"namespaces": list(namespaces)}}


def test_the_spec_names_its_network_namespace() -> None:
    assert network_namespace_path(_spec({"type": "pid"}, {"type": "network",
                                                          "path": "/run/netns/cni-1"})) \
        == "/run/netns/cni-1"
    assert network_namespace_path(_spec({"type": "network"})) == ""
    assert network_namespace_path({}) == ""
    assert network_namespace_path({"linux": {"namespaces": "garbage"}}) == ""
    assert network_namespace_path(_spec({"type": "network", "path": 7})) == ""  # type: ignore


def test_the_oci_monitor_mirrors_the_named_namespace_or_its_own(tmp_path: Path) -> None:
    assert container_netns(_spec({"type": "network", "path": "/run/netns/podman"}),
                           tmp_path) == "/run/netns/podman"
    # docker: a new namespace, set up by its prestart hook in the monitor's,
    # recorded by its pin in the container's directory (a /proc/<pid> path
    # would name another process's once the monitor died and its pid came back).
    assert container_netns(_spec({"type": "network"}), tmp_path) == str(tmp_path / "netns")
    assert container_netns(_spec({"type": "pid"}), tmp_path) == ""


def _options(config_path: str = "", body: str = "",
             type_url: str = "runtimeoptions.v1.Options") -> any_pb2.Any:
    message = runtime_options_pb2.Options(config_path=config_path, config_body=body)
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString())


def test_config_path_chooses_the_pods_configuration(tmp_path: Path) -> None:
    current = config_mod.Config()
    chosen = tmp_path / "small.toml"
    chosen.write_text("[hypervisor.qemu]\ndefault_memory = 256\n")
    config = pod_config(_options(str(chosen)), current)
    assert config.source == str(chosen) and config.qemu.default_memory == 256
    assert pod_config(any_pb2.Any(), current) is current  # `ctr run`: no options
    assert pod_config(_options(str(chosen), type_url="containerd.runc.v1.Options"),
                      current) is current


def test_bad_config_paths_are_named(tmp_path: Path) -> None:
    current = config_mod.Config()
    with pytest.raises(ConfigError, match=r"ConfigPath: configuration file .* does not exist"):
        pod_config(_options(str(tmp_path / "missing.toml")), current)
    with pytest.raises(ConfigError, match="not an absolute path"):
        pod_config(_options("relative.toml"), current)
    with pytest.raises(ConfigError, match="ConfigBody"):
        pod_config(_options(body="[runtime]\n"), current)
    with pytest.raises(ConfigError, match="could not be decoded"):
        pod_config(any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\xff\xff"),
                   current)


def test_internetworking_model_is_checked() -> None:
    config = config_mod.parse({"runtime": {"internetworking_model": "none"}}, "test.toml")
    assert config.runtime.internetworking_model == "none"
    assert config_mod.Config().runtime.internetworking_model == "tcfilter"
    with pytest.raises(ConfigError, match=r"internetworking_model = 'macvtap'.*tcfilter"):
        config_mod.parse({"runtime": {"internetworking_model": "macvtap"}}, "test.toml")


def test_the_mirrored_interfaces_are_kept_in_the_sandbox_state(tmp_path: Path) -> None:
    state = SandboxState(id="a", key="a", front_end="run", owner_pid=1, owner_start=2,
                         console_log="", created=0.0, netns="/run/netns/pod",
                         mirrored={"eth0": 2, "net1": 5})
    write_state(tmp_path / "state.json", state)
    assert read_state(tmp_path / "state.json", SandboxState) == state


def test_vhost_net_is_opened_only_where_it_exists(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata.network import tcfilter

    endpoint = tcfilter.Endpoint("eth0", 2, "02:00:00:00:00:01", 1500)
    monkeypatch.setattr(tcfilter, "VHOST_NET", tmp_path / "vhost-net")
    tcfilter.open_vhost([endpoint])
    assert endpoint.vhost_fd == -1  # this machine's case: QEMU's datapath
    (tmp_path / "vhost-net").write_bytes(b"")  # a stand-in file, to see it opened
    tcfilter.open_vhost([endpoint])
    assert endpoint.vhost_fd >= 0
    tcfilter.close_taps([endpoint])
    assert endpoint.vhost_fd == -1


def test_check_says_what_networking_pykata_will_use() -> None:
    from pykata.cli.check_cmd import _networking

    item = _networking(config_mod.Config())
    assert item.value == "tcfilter" and item.ok
    assert ("vhost-net datapath" if Path("/dev/vhost-net").exists()
            else "/dev/vhost-net does not exist") in item.detail
    none = config_mod.parse({"runtime": {"internetworking_model": "none"}}, "t.toml")
    assert _networking(none).value == "none"


def test_an_empty_run_root_is_the_default_and_a_relative_one_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata.errors import PykataError
    from pykata.runtime.paths import DEFAULT_RUN_ROOT, run_root

    monkeypatch.setenv("PYKATA_RUN_ROOT", "")
    assert run_root() == Path(DEFAULT_RUN_ROOT)
    monkeypatch.setenv("PYKATA_RUN_ROOT", "relative/dir")
    with pytest.raises(PykataError, match="not an absolute path"):
        run_root()
