"""`pykata install containerd` checked by the real containerd 1.6 (Debian 12's).

The installer runs as a user runs it (`.venv/bin/pykata install containerd`)
against a scratch configuration directory; then containerd itself reads the
result: `containerd config dump` must show the pykata handler, and a private
containerd (its own root, state and socket in the test's directory, the CRI
plugin on) started with it must load its CRI plugin with that handler. No pod
is started (tests/cri does that), so no network namespace is needed; the CRI
plugin's CNI configuration directory is the test's own, empty.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config

PYKATA = Path(sys.executable).parent / "pykata"
SHIM = Path(sys.executable).parent / "containerd-shim-pykata-v2"
CRI = "io.containerd.grpc.v1.cri"

# Debian 12's /etc/containerd/config.toml, with what a running containerd
# would write to or watch on the host moved into the test's directory.
DEBIAN_LIKE = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"
"""


def install(base: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYKATA), "install", "containerd", "--config-dir", str(base / "etc"),
         "--bin-dir", str(base / "bin"), "--pykata-config", str(base / "pykata.toml"), *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def config_dump(config_toml: Path) -> dict[str, Any]:
    proc = subprocess.run(["containerd", "--config", str(config_toml), "config", "dump"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return tomllib.loads(proc.stdout)


def runtimes(dump: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = dump["plugins"][CRI]["containerd"]["runtimes"]
    return result


def assert_pykata_handler(dump: dict[str, Any], base: Path) -> None:
    pykata = runtimes(dump)["pykata"]
    assert pykata["runtime_type"] == "io.containerd.pykata.v2"
    assert pykata["pod_annotations"] == ["io.katacontainers.*"]
    assert pykata["privileged_without_host_devices"] is True
    assert pykata["options"]["ConfigPath"] == str(base / "pykata.toml")
    # The CRI plugin refuses to load when its default runtime is not defined.
    assert runtimes(dump)["runc"]["runtime_type"] == "io.containerd.runc.v2"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "pykata.toml").write_bytes(config.DEFAULT_CONFIG.read_bytes())
    return tmp_path


def test_debian_config_gains_the_handler_and_keeps_its_own(base: Path) -> None:
    (base / "etc").mkdir()
    original = DEBIAN_LIKE.format(base=base)
    (base / "etc" / "config.toml").write_text(original)

    first = install(base)
    assert first.returncode == 0, first.stderr
    assert f"linked {base}/bin/containerd-shim-pykata-v2 -> {SHIM}" in first.stdout
    assert "next: systemctl restart containerd" in first.stdout
    assert os.readlink(base / "bin" / "containerd-shim-pykata-v2") == str(SHIM)
    version = subprocess.run([str(base / "bin" / "containerd-shim-pykata-v2"), "-v"],
                             capture_output=True, text=True, timeout=30)
    assert "io.containerd.pykata.v2" in version.stdout  # the link runs the shim

    dump = config_dump(base / "etc" / "config.toml")
    assert_pykata_handler(dump, base)
    assert dump["plugins"][CRI]["cni"]["bin_dir"] == "/usr/lib/cni"  # the node's own stays

    second = install(base)
    assert second.returncode == 0 and "nothing changed" in second.stdout, second.stdout

    with private_containerd(base) as log_path:
        pass
    log = log_path.read_text()
    cri_start = [line for line in log.splitlines() if "Start cri plugin with config" in line]
    assert cri_start, log
    assert "pykata:{Type:io.containerd.pykata.v2" in cri_start[0]
    assert "PodAnnotations:[io.katacontainers.*]" in cri_start[0]
    assert f"Options:map[ConfigPath:{base}/pykata.toml]" in cri_start[0]
    problems = [line for line in log.splitlines()
                if ("level=error" in line or "level=fatal" in line)
                and ("pykata" in line or "runtime" in line)]
    assert not problems, "\n".join(problems)

    removed = install(base, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert (base / "etc" / "config.toml").read_text() == original
    assert not (base / "bin").exists()
    assert not (base / "etc" / "config.toml.pykata-backup").exists()


def test_missing_config_gets_one_containerd_reads(base: Path) -> None:
    result = install(base)
    assert result.returncode == 0, result.stderr
    assert f"wrote {base}/etc/config.toml" in result.stdout
    assert_pykata_handler(config_dump(base / "etc" / "config.toml"), base)
    assert install(base, "--uninstall").returncode == 0
    assert sorted(p.name for p in base.iterdir()) == ["pykata.toml"]


def test_refusals_name_the_file_and_change_nothing(base: Path) -> None:
    (base / "etc").mkdir()
    (base / "etc" / "config.toml").write_text('[plugins.cri]\n  sandbox_image = "pause"\n')
    result = install(base)
    assert result.returncode == 1
    assert f"{base}/etc/config.toml is a version 1 containerd configuration" in result.stderr
    assert "version = 2" in result.stderr  # and what to do about it
    assert sorted(p.name for p in (base / "etc").iterdir()) == ["config.toml"]
    assert not (base / "bin").exists()


def test_why_not_an_imports_drop_in(base: Path) -> None:
    """The reason the installer edits config.toml: in containerd 1.6 an
    imported file's CRI tables replace config.toml's whole CRI section (the
    node's cni.bin_dir is lost, and with it the built-in runc runtime, without
    which the CRI plugin does not load). If containerd ever merges them, this
    fails, and a drop-in becomes possible."""
    (base / "conf.d").mkdir()
    (base / "config.toml").write_text(
        DEBIAN_LIKE.format(base=base).replace(
            "version = 2\n", f'version = 2\nimports = ["{base}/conf.d/*.toml"]\n'))
    (base / "conf.d" / "pykata.toml").write_text(
        (Path(__file__).resolve().parents[2] / "deploy" / "containerd-pykata.toml").read_text())
    dump = config_dump(base / "config.toml")
    assert "pykata" in runtimes(dump)
    assert "runc" not in runtimes(dump)
    assert dump["plugins"][CRI]["cni"]["bin_dir"] != "/usr/lib/cni"


def venv_like_a_checkouts(root: Path) -> Path:
    """A venv made with `python3 -m venv` whose .pth file adds this pykata's
    source and its dependencies (as `pip install -e` leaves a checkout's .venv),
    with pykata's two scripts; returns its bin directory."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    site_dir = next((venv / "lib").glob("python3.*/site-packages"))
    ours = [str(Path(config.__file__).parents[2]),
            *(p for p in sys.path if p.endswith("-packages"))]
    (site_dir / "__editable__.pykata.pth").write_text("".join(f"{p}\n" for p in ours))
    for name, module in (("pykata", "pykata.cli.main"), (SHIM.name, "pykata.shim.cli")):
        script = venv / "bin" / name
        script.write_text(f"#!{venv}/bin/python3\nimport sys\nfrom {module} import main\n"
                          "sys.exit(main())\n")
        script.chmod(0o755)
    return venv / "bin"


def test_a_venv_another_user_owns_is_refused(base: Path) -> None:
    """The issue's case: the installer of a venv that another user (here
    nobody) owns would link a shim that user can rewrite, and containerd would
    run it as root. Refused, --dry-run too, naming the venv; the same venv
    root's alone is accepted."""
    bin_dir = venv_like_a_checkouts(base / "home")
    command = [str(bin_dir / "pykata"), "install", "containerd",
               "--config-dir", str(base / "etc"), "--bin-dir", str(base / "bin"),
               "--pykata-config", str(base / "pykata.toml"), "--dry-run"]
    accepted = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr
    assert f"would link {base}/bin/{SHIM.name} -> {bin_dir}/{SHIM.name}" in accepted.stdout
    for entry in (base / "home", *(base / "home").rglob("*")):
        os.chown(entry, 65534, 65534, follow_symlinks=False)
    for extra in ((), ("--dry-run",)):
        refused = subprocess.run(command[:-1] + list(extra), capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1
        assert "would link" not in refused.stdout and "linked" not in refused.stdout
        assert f"{base}/home is owned by uid 65534" in refused.stderr, refused.stderr
    assert not (base / "bin").exists() and not (base / "etc").exists()


def test_a_configuration_another_user_owns_is_refused(base: Path) -> None:
    """The configuration the handler names chooses the QEMU root executes."""
    os.chown(base / "pykata.toml", 65534, 65534)
    result = install(base, "--dry-run")
    assert result.returncode == 1 and "would" not in result.stdout
    assert f"{base}/pykata.toml is owned by uid 65534" in result.stderr, result.stderr


@contextlib.contextmanager
def private_containerd(base: Path) -> Iterator[Path]:
    """containerd with the CRI plugin on the test's config.toml, its own root,
    state and socket under `base`; its CRI plugin must have loaded. Yields its
    log file; containerd is stopped on the way out."""
    socket = base / "containerd.sock"
    log_path = base / "containerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["containerd", "--config", str(base / "etc" / "config.toml"),
             "--root", str(base / "root"), "--state", str(base / "state"),
             "--address", str(socket)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"containerd exited:\n{log_path.read_text()}")
            listing = subprocess.run(["ctr", "--address", str(socket), "plugins", "ls"],
                                     capture_output=True, text=True, timeout=10)
            if listing.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not answer:\n{log_path.read_text()}")
            time.sleep(0.1)
        cri = [line.split() for line in listing.stdout.splitlines()
               if line.split()[:2] == ["io.containerd.grpc.v1", "cri"]]
        assert cri, listing.stdout
        assert cri[0][-1] == "ok", f"CRI plugin {cri[0][-1]}:\n{log_path.read_text()}"
        yield log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
