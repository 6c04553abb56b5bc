"""`pykata install containerd|runtimeclass`: the config.toml edit, the plans, the artefacts.

The edit is checked as text (everything outside pykata's block byte for byte)
and as TOML (what containerd would read). tests/functional/test_install_containerd.py
checks the same files with the real containerd.
"""

from __future__ import annotations

import os
import platform
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.cli import install_cmd
from pykata.cli.install_cmd import Settings, plan_install, plan_uninstall, runtimeclass_manifest
from pykata.cli.main import main
from pykata.errors import ConfigError, PykataError
from pykata.install.containerd_config import (
    BACKUP_SUFFIX,
    CRI_PLUGIN,
    Records,
    edit_config,
    find_block,
    remove_block,
    runtime_tables,
)

REPO = Path(__file__).resolve().parents[2]
PYKATA_CONFIG = "/etc/pykata/configuration.toml"

# Debian 12's /etc/containerd/config.toml, as the package ships it.
DEBIAN = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

WITH_RUNC = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""


def runtimes(text: str) -> dict[str, Any]:
    data = tomllib.loads(text)
    result: dict[str, Any] = data["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]
    return result


def assert_pykata_runtime(text: str, config_path: str = PYKATA_CONFIG) -> None:
    pykata = runtimes(text)["pykata"]
    assert pykata["runtime_type"] == "io.containerd.pykata.v2"
    assert pykata["pod_annotations"] == ["io.katacontainers.*"]
    assert pykata["privileged_without_host_devices"] is True
    assert pykata["options"] == {"ConfigPath": config_path}


def edit(tmp_path: Path, text: str | None, records: Records | None = None) -> str:
    result = edit_config(tmp_path / "config.toml", text, PYKATA_CONFIG, records or Records())
    assert result.changed and result.text is not None
    return result.text


# ---------------------------------------------------------------------------
# The edit

def test_missing_file_gets_a_whole_version_2_config(tmp_path: Path) -> None:
    new = edit(tmp_path, None)
    assert tomllib.loads(new)["version"] == 2
    assert_pykata_runtime(new)
    # containerd's built-in runc would be gone once a runtime is defined: kept.
    assert runtimes(new)["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    assert remove_block(tmp_path / "config.toml", new) == (None, Records())


def test_existing_file_keeps_every_byte(tmp_path: Path) -> None:
    result = edit_config(tmp_path / "config.toml", DEBIAN, PYKATA_CONFIG, Records())
    assert result.changed and result.backup and result.text is not None
    assert result.text.startswith(DEBIAN)
    data = tomllib.loads(result.text)
    assert data["plugins"][CRI_PLUGIN]["cni"]["bin_dir"] == "/usr/lib/cni"
    assert data["plugins"]["io.containerd.internal.v1.opt"] == {"path": "/var/lib/containerd/opt"}
    assert_pykata_runtime(result.text)
    assert "runc" in runtimes(result.text)
    assert "version = 2" not in result.text[len(DEBIAN):]


def test_a_file_defining_runc_gets_no_second_runc(tmp_path: Path) -> None:
    new = edit(tmp_path, WITH_RUNC)
    assert new.startswith(WITH_RUNC) and new.count("runtimes.runc]") == 1
    assert runtimes(new)["runc"]["options"] == {"SystemdCgroup": True}
    assert_pykata_runtime(new)


def test_another_default_runtime_gets_no_runc(tmp_path: Path) -> None:
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  default_runtime_name = "crun"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    assert "runc" not in runtimes(edit(tmp_path, text))


@pytest.mark.parametrize("text", [DEBIAN, DEBIAN.rstrip("\n"), WITH_RUNC, "version = 2\n",
                                  "version = 2\n\n\n# a comment at the end"])
def test_uninstall_gives_the_file_back_byte_for_byte(tmp_path: Path, text: str) -> None:
    new = edit(tmp_path, text)
    assert remove_block(tmp_path / "config.toml", new) == (text, Records())


def test_a_second_edit_changes_nothing(tmp_path: Path) -> None:
    new = edit(tmp_path, DEBIAN)
    again = edit_config(tmp_path / "config.toml", new, PYKATA_CONFIG, Records())
    assert not again.changed and again.text == new
    assert "already has pykata's runtime" in again.message
    created = edit(tmp_path, None)
    assert not edit_config(tmp_path / "config.toml", created, PYKATA_CONFIG, Records()).changed


def test_the_block_is_updated_in_place(tmp_path: Path) -> None:
    """A changed setting rewrites the block where it is; text after it stays."""
    new = edit(tmp_path, DEBIAN) + "# added later by someone\n"
    result = edit_config(tmp_path / "config.toml", new, "/etc/pykata/small.toml", Records())
    assert result.changed and result.text is not None
    assert "updated" in result.message
    assert result.text.startswith(DEBIAN) and result.text.endswith("# added later by someone\n")
    assert_pykata_runtime(result.text, "/etc/pykata/small.toml")
    assert remove_block(tmp_path / "config.toml", result.text) == (
        DEBIAN + "# added later by someone\n", Records())


def test_records_round_trip(tmp_path: Path) -> None:
    records = Records(links=(("/usr/local/bin/containerd-shim-pykata-v2", "/opt/x/shim"),),
                      files=("/etc/pykata/configuration.toml",), dirs=("/etc/pykata",))
    new = edit(tmp_path, DEBIAN, records)
    block = find_block(new, tmp_path / "config.toml")
    assert block is not None and block.records == records


def test_other_imports_are_fine(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "debug.toml").write_text('version = 2\n[debug]\n  level = "info"\n')
    text = 'version = 2\nimports = ["conf.d/*.toml", "/nonexistent/*.toml"]\n'
    new = edit(tmp_path, text)
    assert new.startswith(text)
    assert tomllib.loads(new)["imports"] == ["conf.d/*.toml", "/nonexistent/*.toml"]
    assert_pykata_runtime(new)


def test_an_import_with_cri_settings_is_refused(tmp_path: Path) -> None:
    """It would replace config.toml's whole CRI section, pykata's runtime with it."""
    (tmp_path / "conf.d").mkdir()
    imported = tmp_path / "conf.d" / "registry.toml"
    imported.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                        '  config_path = "/etc/containerd/certs.d"\n')
    with pytest.raises(ConfigError) as error:
        edit(tmp_path, f'version = 2\nimports = ["{tmp_path}/conf.d/*.toml"]\n')
    assert str(imported) in str(error.value) and "replace" in str(error.value)
    assert "deploy/containerd-pykata.toml" in str(error.value)


@pytest.mark.parametrize(("text", "expected"), [
    ('[plugins.cri]\n  sandbox_image = "pause"\n', "version 1 containerd configuration"),
    ("version = 1\n", "version 1 containerd configuration"),
    ("", "version 1 containerd configuration"),
    ("version = 3\n", "not containerd 1.6's"),
    ("version = 2\n[plugins\n", "not valid TOML"),
    ("\x00garbage = = =", "not valid TOML"),
])
def test_what_cannot_be_edited_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError) as error:
        edit_config(path, text, PYKATA_CONFIG, Records())
    assert str(path) in str(error.value) and expected in str(error.value)
    assert error.value.hint  # and what to do about it


def test_a_foreign_pykata_runtime_is_refused(tmp_path: Path) -> None:
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    with pytest.raises(ConfigError) as error:
        edit(tmp_path, text)
    assert "io.containerd.runc.v2" in str(error.value) and "rename or remove" in str(error.value)


def test_a_hand_written_pykata_runtime_is_left_alone(tmp_path: Path) -> None:
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n'
            '  runtime_type = "io.containerd.pykata.v2"\n')
    result = edit_config(tmp_path / "config.toml", text, PYKATA_CONFIG, Records())
    assert not result.changed and result.text == text and "left as it is" in result.message


def test_tables_that_cannot_be_extended_are_refused(tmp_path: Path) -> None:
    """An inline runtimes table cannot get a [..runtimes.pykata] table added."""
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n')
    with pytest.raises(ConfigError) as error:
        edit(tmp_path, text)
    assert "by hand" in str(error.value)


@pytest.mark.parametrize("text", [
    "version = 2\n# BEGIN pykata\n[x]\n",
    "version = 2\n# BEGIN pykata\n# BEGIN pykata\n# END pykata\n",
])
def test_broken_markers_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as error:
        edit(tmp_path, text)
    assert BACKUP_SUFFIX in str(error.value)


def test_paths_with_quotes_are_toml_strings() -> None:
    tables = runtime_tables('/etc/pykata/"odd"\\name.toml')
    data = tomllib.loads("version = 2\n" + tables)
    pykata = data["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]["pykata"]
    assert pykata["options"]["ConfigPath"] == '/etc/pykata/"odd"\\name.toml'


# ---------------------------------------------------------------------------
# The command, in a scratch directory

def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under root: mode, and contents (a link's target)."""
    result: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            result[str(path)] = (st.st_mode, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            result[str(path)] = (st.st_mode, path.read_bytes())
        else:
            result[str(path)] = (st.st_mode, "")
    return result


@pytest.fixture
def node(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.toml").write_text(DEBIAN)
    (tmp_path / "pykata.toml").write_bytes(config.DEFAULT_CONFIG.read_bytes())
    return tmp_path


def install(node: Path, *extra: str) -> int:
    return main(["install", "containerd", "--config-dir", str(node / "etc"),
                 "--bin-dir", str(node / "bin"), "--pykata-config", str(node / "pykata.toml"),
                 *extra])


def test_install_reinstall_uninstall(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(node)
    assert install(node) == 0
    out = capsys.readouterr().out
    shim = os.readlink(node / "bin" / install_cmd.SHIM_NAME)
    assert Path(shim).is_file() and Path(shim).name == "containerd-shim-pykata-v2"
    assert f"linked {node}/bin/containerd-shim-pykata-v2 -> {shim}" in out
    assert f"added pykata's runtime to {node}/etc/config.toml" in out
    assert "next: systemctl restart containerd" in out
    config_toml = (node / "etc" / "config.toml").read_text()
    assert config_toml.startswith(DEBIAN)
    assert_pykata_runtime(config_toml, str(node / "pykata.toml"))
    assert (node / "etc" / f"config.toml{BACKUP_SUFFIX}").read_text() == DEBIAN
    assert stat.S_IMODE((node / "etc" / "config.toml").stat().st_mode) == 0o644

    installed = tree(node)
    assert install(node) == 0
    out = capsys.readouterr().out
    assert "nothing changed" in out and "already has pykata's runtime" in out
    assert "already links to" in out and "next:" not in out
    assert tree(node) == installed

    assert install(node, "--uninstall") == 0
    out = capsys.readouterr().out
    assert f"removed pykata's runtime from {node}/etc/config.toml" in out
    assert f"removed directory {node}/bin" in out
    assert tree(node) == before
    assert install(node, "--uninstall") == 0
    assert "nothing changed" in capsys.readouterr().out


def test_dry_run_changes_nothing(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(node)
    assert install(node, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would link" in out and "would add pykata's runtime" in out
    assert "would write" in out and tree(node) == before
    assert install(node) == 0
    installed = tree(node)
    assert install(node, "--uninstall", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would remove pykata's runtime" in out and tree(node) == installed


def test_a_private_config_keeps_its_mode(node: Path) -> None:
    path = node / "etc" / "config.toml"
    path.chmod(0o600)
    assert install(node) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{path}{BACKUP_SUFFIX}").stat().st_mode) == 0o600


def test_uninstall_keeps_the_backup_when_the_file_changed(
        node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(node) == 0
    path = node / "etc" / "config.toml"
    path.write_text(path.read_text() + "# the admin's own line\n")
    assert install(node, "--uninstall") == 0
    assert "kept" in capsys.readouterr().out
    assert path.read_text() == DEBIAN + "# the admin's own line\n"
    assert Path(f"{path}{BACKUP_SUFFIX}").read_text() == DEBIAN


def test_a_foreign_shim_is_not_overwritten(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (node / "bin").mkdir()
    (node / "bin" / "containerd-shim-pykata-v2").write_text("#!/bin/sh\n")
    before = tree(node)
    assert install(node) == 1
    err = capsys.readouterr().err
    assert f"{node}/bin/containerd-shim-pykata-v2 exists and is not a link" in err
    assert "rm " in err and tree(node) == before  # refused before changing anything


def test_a_stale_backup_is_not_overwritten(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (node / "etc" / f"config.toml{BACKUP_SUFFIX}").write_text("version = 2\n# older\n")
    before = tree(node)
    assert install(node) == 1
    assert "move" in capsys.readouterr().err and tree(node) == before


def test_a_missing_named_pykata_config_is_refused(
        node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (node / "pykata.toml").unlink()
    assert install(node) == 1
    err = capsys.readouterr().err
    assert f"{node}/pykata.toml does not exist" in err and str(config.DEFAULT_CONFIG) in err


def test_a_bad_pykata_config_is_refused(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (node / "pykata.toml").write_text("[hypervisor.qemu]\ndefault_memroy = 1\n")
    assert install(node) == 1
    assert "default_memroy" in capsys.readouterr().err


def test_the_default_pykata_config_is_written_and_removed(node: Path) -> None:
    """Without --pykata-config the handler names /etc/pykata/configuration.toml;
    a missing one is written (pykata's default) and goes with --uninstall."""
    before = tree(node)
    target = node / "etc-pykata" / "configuration.toml"
    settings = Settings(config_dir=node / "etc", bin_dir=node / "bin",
                        pykata_config=target, pykata_config_given=False)
    plan_install(settings).run(dry_run=False)
    assert target.read_bytes() == config.DEFAULT_CONFIG.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not plan_install(settings).steps
    plan_uninstall(settings).run(dry_run=False)
    assert tree(node) == before


def test_a_changed_default_pykata_config_stays(
        node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = node / "etc-pykata" / "configuration.toml"
    settings = Settings(config_dir=node / "etc", bin_dir=node / "bin",
                        pykata_config=target, pykata_config_given=False)
    plan_install(settings).run(dry_run=False)
    target.write_text("[runtime]\nenable_debug = true\n")
    plan_uninstall(settings).run(dry_run=False)
    assert f"left {target}" in capsys.readouterr().out
    assert target.exists() and not (node / "bin").exists()


def test_unwritable_places_are_reported(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(install_cmd, "write_atomic", refuse)
    with pytest.raises(PykataError) as error:
        plan_install(Settings(node / "etc", node / "bin", node / "pykata.toml",
                              True)).run(dry_run=False)
    assert "Permission denied" in str(error.value) and "root" in str(error.value)


# ---------------------------------------------------------------------------
# The artefacts in deploy/

def parse_simple_yaml(text: str) -> dict[str, Any]:
    """Block mappings of scalars, as the RuntimeClass is written (no YAML
    library in the environment)."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]
    for line in text.splitlines():
        assert line.strip() and not line.lstrip().startswith("#"), line
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        assert sep, line
        while stack[-1][0] >= indent:
            stack.pop()
        value = value.strip()
        if value:
            stack[-1][1][key] = value.strip('"')
        else:
            child: dict[str, Any] = {}
            stack[-1][1][key] = child
            stack.append((indent, child))
    return root


def test_runtimeclass_manifest_is_the_deploy_file() -> None:
    manifest = runtimeclass_manifest(config.load(config.DEFAULT_CONFIG))
    assert (REPO / "deploy" / "runtimeclass.yaml").read_text() == manifest
    assert parse_simple_yaml(manifest) == {
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "pykata"}, "handler": "pykata",
        "overhead": {"podFixed": {"memory": "256Mi", "cpu": "50m"}},
    }


def test_runtimeclass_follows_the_configuration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "big.toml"
    cfg.write_text("[runtime]\nsandbox_overhead_memory_mib = 2048\n"
                   "sandbox_overhead_millicpus = 2000\n")
    assert main(["install", "runtimeclass", "--pykata-config", str(cfg)]) == 0
    podfixed = parse_simple_yaml(capsys.readouterr().out)["overhead"]["podFixed"]
    assert podfixed == {"memory": "2048Mi", "cpu": "2000m"}
    out = tmp_path / "rc.yaml"
    assert main(["install", "runtimeclass", "--pykata-config", str(cfg),
                 "--manifest", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and "2048Mi" in out.read_text()


def test_the_deploy_toml_has_the_installers_tables() -> None:
    text = (REPO / "deploy" / "containerd-pykata.toml").read_text()
    data = tomllib.loads(text)
    assert data["version"] == 2
    assert runtimes(text) == runtimes("version = 2\n" + runtime_tables(str(config.SYSTEM_CONFIG)))
    assert str(config.SYSTEM_CONFIG) == PYKATA_CONFIG


# ---------------------------------------------------------------------------
# Who can change what containerd runs as root

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to nobody needs root")


def fake_venv(root: Path) -> Path:
    """A venv as `python3 -m venv` and `pip install -e <checkout>` leave it, in
    miniature (this Python as its base; the checkout's src/ added by a .pth
    file); returns its shim."""
    base = os.path.realpath(sys.executable)
    short = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(base, venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(base)}\n"
                                     "include-system-site-packages = false\n"
                                     f"version = {platform.python_version()}\n")
    site_dir = venv / "lib" / short / "site-packages"
    site_dir.mkdir(parents=True)
    package = root / "checkout" / "src" / "pykata"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (site_dir / "__editable__.pykata-0.1.0.pth").write_text(f"{package.parent}\n")
    shim = venv / "bin" / install_cmd.SHIM_NAME
    shim.write_text(f"#!{venv}/bin/python3\nfrom pykata.shim.cli import main\nmain()\n")
    shim.chmod(0o755)
    return shim


def give_to_nobody(path: Path) -> None:
    for entry in (path, *path.rglob("*")):
        os.chown(entry, NOBODY, NOBODY, follow_symlinks=False)


@pytest.fixture
def venv_shim(node: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The installer's shim is `fake_venv`'s, under node/."""
    shim = fake_venv(node / "opt")
    monkeypatch.setattr(install_cmd, "find_shim", lambda: shim)
    return shim


def refused(node: Path, capsys: pytest.CaptureFixture[str], named: Path) -> str:
    """Install, then the dry run, both refused naming `named`; nothing changed."""
    before = tree(node)
    for extra in ((), ("--dry-run",)):
        assert install(node, *extra) == 1
        captured = capsys.readouterr()
        assert "would" not in captured.out and "linked" not in captured.out
        assert f"{named} is " in captured.err, captured.err
        assert "another user can change" in captured.err, captured.err
    assert tree(node) == before
    return captured.err


@needs_root
def test_a_root_owned_venv_is_accepted(
        node: Path, venv_shim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same tree as the refusals below, root's alone: installed (and under
    /tmp, a root-owned sticky directory on the way, which is fine)."""
    assert install(node, "--dry-run") == 0
    assert f"would link {node}/bin/containerd-shim-pykata-v2 -> {venv_shim}" in \
        capsys.readouterr().out
    assert install(node) == 0
    assert os.readlink(node / "bin" / install_cmd.SHIM_NAME) == str(venv_shim)


@needs_root
@pytest.mark.parametrize("given", [
    "opt/venv",                                   # the whole venv (the case)
    "opt/venv/bin/containerd-shim-pykata-v2",     # the shim alone
    "opt/venv/pyvenv.cfg",                        # it chooses the Python that runs
    "opt/venv/lib",                               # site-packages and its .pth files
    "opt/checkout/src",                           # what the editable install's .pth adds
    "opt/checkout",                               # a directory above that
])
def test_what_another_user_owns_is_refused(
        node: Path, venv_shim: Path, capsys: pytest.CaptureFixture[str], given: str) -> None:
    """A part of what the shim runs or imports owned by nobody: refused, naming
    that part, before anything is changed, with --dry-run as without."""
    give_to_nobody(node / given)
    err = refused(node, capsys, node / given)
    assert f"owned by uid {NOBODY}" in err and "pip install" in err


@needs_root
def test_a_directory_others_can_write_is_refused(
        node: Path, venv_shim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Group- or world-writable, even root's and sticky, inside what Python
    imports from (a new file there is a new module); world-writable and not
    sticky on the way to it."""
    site_dir = next((node / "opt" / "venv" / "lib").glob("python*/site-packages"))
    os.chown(site_dir, 0, NOBODY)
    site_dir.chmod(0o775)
    assert f"writable by its group, gid {NOBODY}" in refused(node, capsys, site_dir)
    site_dir.chmod(0o1777)
    assert "writable by every user" in refused(node, capsys, site_dir)
    site_dir.chmod(0o755)
    (node / "opt").chmod(0o777)
    assert "writable by every user" in refused(node, capsys, node / "opt")
    (node / "opt").chmod(0o1777)  # sticky and root's: its root-owned entries stay put
    assert install(node, "--dry-run") == 0


@needs_root
def test_an_editable_finder_is_followed(
        node: Path, venv_shim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """setuptools' other editable layout: a .pth that imports a finder mapping
    each package to its directory. The mapped directory counts."""
    site_dir = next((node / "opt" / "venv" / "lib").glob("python*/site-packages"))
    (site_dir / "__editable__.pykata-0.1.0.pth").write_text(
        "import __editable___pykata_0_1_0_finder; __editable___pykata_0_1_0_finder.install()\n")
    mapped = node / "elsewhere" / "pykata"
    mapped.mkdir(parents=True)
    (site_dir / "__editable___pykata_0_1_0_finder.py").write_text(
        f"import sys\nMAPPING: dict[str, str] = {{'pykata': {str(mapped)!r}}}\n"
        "NAMESPACES: dict[str, list[str]] = {}\n")
    assert install(node, "--dry-run") == 0
    capsys.readouterr()
    give_to_nobody(mapped)
    assert "editable install" in refused(node, capsys, mapped)


@needs_root
def test_the_configuration_and_the_qemu_it_names_are_root_only(
        node: Path, venv_shim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The configuration ConfigPath names, and the QEMU binary it chooses: root
    executes that binary."""
    config_file = node / "pykata.toml"
    os.chown(config_file, NOBODY, NOBODY)
    err = refused(node, capsys, config_file)
    assert "pykata configuration" in err and "chown root" in err
    os.chown(config_file, 0, 0)
    qemu_dir = node / "qemu-bin"
    qemu_dir.mkdir()
    (qemu_dir / "qemu-system-x86_64").write_bytes(b"\x7fELF")
    config_file.write_text(f'[hypervisor.qemu]\npath = "{qemu_dir}/qemu-system-x86_64"\n')
    assert install(node, "--dry-run") == 0
    capsys.readouterr()
    os.chown(qemu_dir, NOBODY, NOBODY)
    assert "QEMU binary" in refused(node, capsys, qemu_dir)
