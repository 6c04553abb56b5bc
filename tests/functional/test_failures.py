"""Bad input and failing VMs: a clear message, and nothing left running or mounted.

The autouse `no_leftovers` fixture checks after each test that no QEMU
process, mount or /run/pykata state remains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pykata.assets import AssetPaths
from tests.functional.conftest import Cli


def _config(tmp_path: Path, assets: AssetPaths, **qemu: object) -> str:
    """A configuration file with the built assets and `qemu` overrides."""
    values: dict[str, object] = {"kernel": str(assets.kernel), "initrd": str(assets.initrd)}
    values.update(qemu)
    agent = values.pop("dial_timeout", None)
    lines = ["[hypervisor.qemu]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    if agent is not None:
        lines += ["[agent]", f"dial_timeout = {agent}"]
    path = tmp_path / "configuration.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_missing_kernel_names_the_fix(cli: Cli, tmp_path: Path, guest_assets: AssetPaths) -> None:
    """A kernel path that does not exist fails before QEMU starts, naming `assets build`."""
    config = _config(tmp_path, guest_assets, kernel=str(tmp_path / "no-vmlinux"))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert f"guest kernel not found at {tmp_path / 'no-vmlinux'}" in result.err
    assert "pykata assets build" in result.err


def test_missing_initrd_names_the_fix(cli: Cli, tmp_path: Path, guest_assets: AssetPaths) -> None:
    """A missing initrd fails the same way."""
    config = _config(tmp_path, guest_assets, initrd=str(tmp_path / "no-initrd"))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert "guest initrd not found" in result.err
    assert "pykata assets build" in result.err


def test_missing_root_image_names_the_fix(cli: Cli, tmp_path: Path,
                                          guest_assets: AssetPaths) -> None:
    """A root image path that does not exist fails before QEMU starts."""
    config = _config(tmp_path, guest_assets, initrd="", image=str(tmp_path / "no-root.img"))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert f"guest root image not found at {tmp_path / 'no-root.img'}" in result.err
    assert "pykata assets build" in result.err


@pytest.mark.parametrize("dax", [True, False], ids=["dax", "disk"])
def test_a_root_image_that_is_no_filesystem(cli: Cli, tmp_path: Path,
                                            guest_assets: AssetPaths, dax: bool) -> None:
    """An image the guest kernel cannot mount ends the VM at boot: the error
    says the kernel never reached init and quotes its console, and nothing
    is left behind (no_leftovers). Mapped into the guest (DAX) or as a disk."""
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (2 << 20))
    config = _config(tmp_path, guest_assets, initrd="", image=str(junk),
                     disable_image_nvdimm=not dax)
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert "Unable to mount root fs" in result.err, result.err


def test_a_root_image_that_cannot_be_mapped(cli: Cli, tmp_path: Path,
                                            guest_assets: AssetPaths) -> None:
    """An image whose size is no whole number of 2 MiB cannot be mapped
    into the guest: refused before QEMU starts, with both fixes."""
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20) + b"x")
    config = _config(tmp_path, guest_assets, initrd="", image=str(junk))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert f"guest root image {junk} is {(1 << 20) + 1} bytes, not a multiple of 2 MiB" \
        in result.err, result.err
    assert "pykata assets build" in result.err and "disable_image_nvdimm = true" in result.err


def test_missing_qemu_binary(cli: Cli, tmp_path: Path, guest_assets: AssetPaths) -> None:
    """A QEMU path that does not exist is reported with the package to install."""
    config = _config(tmp_path, guest_assets, path=str(tmp_path / "qemu-system-x86_64"))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert "QEMU not found" in result.err and "qemu-system-x86" in result.err


def test_rootfs_that_does_not_exist(cli: Cli, tmp_path: Path) -> None:
    """--rootfs naming a missing directory fails before any VM starts."""
    result = cli("run", "--rootfs", str(tmp_path / "nothing"), "--", "true")
    assert result.returncode != 0
    assert f"rootfs {tmp_path / 'nothing'} does not exist" in result.err


def _bundle(tmp_path: Path, process: dict[str, object]) -> Path:
    """An OCI bundle with an empty rootfs and the given process."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": process, "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def test_invalid_config_json_names_the_field(cli: Cli, tmp_path: Path) -> None:
    """A config.json whose process.args is not a list is refused, naming the field."""
    bundle = _bundle(tmp_path, {"args": "echo hi", "cwd": "/"})
    result = cli("run", "--bundle", str(bundle))
    assert result.returncode != 0
    assert "process.args" in result.err


def test_invalid_nested_field_is_named(cli: Cli, tmp_path: Path) -> None:
    """A wrongly typed nested field (an rlimit's hard limit) is named with its path."""
    bundle = _bundle(tmp_path, {"args": ["true"], "cwd": "/", "rlimits": [
        {"type": "RLIMIT_NOFILE", "hard": "lots", "soft": 1}]})
    result = cli("run", "--bundle", str(bundle))
    assert result.returncode != 0
    assert "process.rlimits[0].hard" in result.err


def test_config_json_that_is_not_json(cli: Cli, tmp_path: Path) -> None:
    """A config.json that does not parse says so, with its path."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    result = cli("run", "--bundle", str(bundle))
    assert result.returncode != 0
    assert f"{bundle / 'config.json'} is not valid JSON" in result.err


def test_qemu_that_fails_to_start_shows_its_error(
    cli: Cli, tmp_path: Path, guest_assets: AssetPaths
) -> None:
    """A file that is not a kernel: QEMU refuses it, and its own words are shown."""
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"\x7fELF" + b"\0" * 4096)
    config = _config(tmp_path, guest_assets, kernel=str(junk))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert "QEMU failed to start" in result.err or "stopped while booting" in result.err
    assert "QEMU said:" in result.err


def test_guest_that_cannot_boot_shows_the_console_tail(
    cli: Cli, tmp_path: Path, guest_assets: AssetPaths
) -> None:
    """A guest whose init is missing panics; the error shows the end of its console."""
    config = _config(tmp_path, guest_assets, kernel_params="rdinit=/no/such/init")
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert "stopped while booting" in result.err
    assert "Kernel panic" in result.err or "No working init" in result.err


def test_agent_that_never_answers_is_killed_after_dial_timeout(
    cli: Cli, tmp_path: Path, guest_assets: AssetPaths
) -> None:
    """A guest that boots but runs no agent: the run gives up after dial_timeout
    and the VM is stopped (the no_leftovers check finds no QEMU)."""
    config = _config(tmp_path, guest_assets, kernel_params="rdinit=/sbin/init", dial_timeout=8)
    start = time.monotonic()
    result = cli("--config", config, "run", "--", "true")
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "did not answer within 8 s (dial_timeout)" in result.err
    assert elapsed < 60


def test_unknown_configuration_key_names_file_and_key(cli: Cli, tmp_path: Path) -> None:
    """A typo in the configuration is an error naming the file and the key."""
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor.qemu]\ndefault_memroy = 1024\n")
    result = cli("--config", str(path), "run", "--", "true")
    assert result.returncode != 0
    assert str(path) in result.err
    assert "hypervisor.qemu.default_memroy" in result.err


def test_cleanup_after_a_killed_run(cli: Cli) -> None:
    """`pykata run` killed with SIGKILL: its VM dies with it, and `pykata cleanup`
    removes the mounts and state it could not remove itself."""
    import os
    import signal
    import subprocess
    import sys

    from tests.functional.conftest import qemu_processes

    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--", "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    def run_vms() -> list[str]:  # other tests' shared VM may still be running
        return [line for line in qemu_processes() if "-name pykata-run-" in line]

    deadline = time.monotonic() + 30
    while run_vms() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not run_vms()  # QEMU died with its owner
    result = cli("cleanup")
    assert result.returncode == 0, result.err
    assert "removing sandbox run-" in result.out
    assert "nothing to clean up" in cli("cleanup").out


def test_sigterm_while_starting_leaves_nothing(cli: Cli) -> None:
    """SIGTERM to `pykata run` while its VM is still booting: the run stops with
    128+SIGTERM, and its QEMU, mounts and state directory are gone (the
    no_leftovers check)."""
    import signal
    import subprocess
    import sys

    from tests.functional.conftest import qemu_processes

    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--", "true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any("-name pykata-run-" in line for line in qemu_processes()):
            assert proc.poll() is None and time.monotonic() < deadline, "no VM started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_shared_fs_that_cannot_be_honoured_stops_the_start(
        cli: Cli, tmp_path: Path, guest_assets: AssetPaths) -> None:
    """shared_fs = "virtio-fs" where it cannot be served (no virtiofsd at the
    configured path): `pykata run` fails naming the setting, its file, what is
    missing and the fix, before any VM starts (no_leftovers checks that nothing
    was made), instead of running the container over 9p; `pykata check`
    reports the same refusal."""
    missing = tmp_path / "virtiofsd"
    config = _config(tmp_path, guest_assets, shared_fs="virtio-fs",
                     virtio_fs_daemon=str(missing))
    result = cli("--config", config, "run", "--", "true")
    assert result.returncode != 0
    assert 'shared_fs = "virtio-fs"' in result.err and config in result.err
    assert str(missing) in result.err and 'shared_fs = "virtio-9p"' in result.err
    check = cli("--config", config, "check")
    assert check.returncode != 0
    assert any(line.startswith("FAIL shared filesystem") for line in check.out.splitlines())
