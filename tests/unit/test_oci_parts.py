"""pykata-oci's parsing and wording, without a VM."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest

from pykata.errors import AlreadyExistsError, NotFoundError, PykataError
from pykata.oci import cli, verbs
from pykata.oci.store import Store, check_id
from pykata.runtime.ready import ReadyReport
from pykata.runtime.spec import default_spec
from pykata.runtime.state import ContainerState, write_state


@pytest.mark.parametrize(("text", "number"), [
    ("TERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL), ("9", 9), ("usr1", signal.SIGUSR1),
])
def test_signals_by_name_or_number(text: str, number: int) -> None:
    assert verbs.parse_signal(text) == number


@pytest.mark.parametrize("text", ["NOPE", "0", "65", "-1"])
def test_bad_signals_are_refused(text: str) -> None:
    with pytest.raises(PykataError):
        verbs.parse_signal(text)


def test_durations_and_sizes() -> None:
    assert verbs._interval("5s") == 5.0
    assert verbs._interval("250ms") == 0.25
    with pytest.raises(PykataError, match="interval"):
        verbs._interval("soon")
    assert verbs._bytes("64m") == 64 << 20 and verbs._bytes("1024") == 1024
    with pytest.raises(PykataError, match="size"):
        verbs._bytes("lots")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a b", "x" * 1025])
def test_container_ids_as_runc_takes_them(bad: str) -> None:
    assert check_id("abc-1.2_3+4") == "abc-1.2_3+4"
    with pytest.raises(PykataError):
        check_id(bad)


def test_store_claims_an_id_once_and_reads_a_dead_monitor_as_stopped(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    path = store.claim("c1")
    with pytest.raises(AlreadyExistsError):
        store.claim("c1")
    with pytest.raises(NotFoundError):
        store.load("c2")
    write_state(path / "state.json", ContainerState(
        id="c1", bundle="/b", status="running", sandbox_key="k", run_root="/r",
        created="now", owner="", rootfs="/b/rootfs", monitor_pid=1, monitor_start=1))
    assert store.load("c1").status == "stopped"  # pid 1 did not start at tick 1
    assert verbs.oci_state(store.load("c1"))["pid"] == 0
    store.remove("c1")
    assert store.ids() == []


def _exec_args(**values: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "process": "", "tty": False, "env": [], "cwd": "", "user": "", "additional_gids": [],
        "cap": [], "no_new_privs": False, "command": []}
    defaults.update(values)
    return argparse.Namespace(**defaults)


def test_the_root_is_made_private_and_an_existing_one_keeps_its_mode(tmp_path: Path) -> None:
    """`--root` names a directory pykata may not own alone (`--root /run`):
    one it makes is 0700, an existing one keeps its mode, one others can
    write is refused (it would hold the containers' records)."""
    made = tmp_path / "made" / "oci"
    Store(made).claim("a")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    shared = tmp_path / "run"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    Store(shared).claim("b")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "b").stat().st_mode) == 0o700
    open_to_all = tmp_path / "tmp"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o1777)
    with pytest.raises(PykataError, match="chmod go-w"):
        Store(open_to_all).claim("c")
    assert stat.S_IMODE(open_to_all.stat().st_mode) == 0o1777 and not (open_to_all / "c").exists()


def test_exec_builds_on_the_containers_process(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"process": {
        "args": ["init"], "env": ["PATH=/bin", "A=1"], "cwd": "/srv",
        "user": {"uid": 0, "gid": 0}, "capabilities": {"bounding": ["CAP_KILL"]}}}))
    record = ContainerState(id="c", bundle=str(tmp_path), status="running", sandbox_key="k",
                            run_root="/r", created="", owner="", rootfs="")
    process = verbs._exec_process(_exec_args(
        command=["sh", "-c", "id"], env=["B=2"], user="1000:1001", additional_gids=["5"],
        cap=["CAP_NET_RAW"], tty=True), record)
    assert process["args"] == ["sh", "-c", "id"] and process["terminal"] is True
    assert process["env"] == ["PATH=/bin", "A=1", "B=2"] and process["cwd"] == "/srv"
    assert process["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [5]}
    assert process["capabilities"]["bounding"] == ["CAP_KILL", "CAP_NET_RAW"]
    with pytest.raises(PykataError, match="command"):
        verbs._exec_process(_exec_args(), record)
    with pytest.raises(PykataError, match="UID"):
        verbs._exec_process(_exec_args(command=["id"], user="root"), record)


def _raised(report: ReadyReport) -> PykataError:
    with pytest.raises(PykataError) as info:
        report.raise_error()
    return info.value


def test_not_executable_is_worded_as_docker_reads_it() -> None:
    """The monitor's report of a create that failed, as `create` prints it."""
    missing = _raised(ReadyReport(ok=False, error="crun create: executable file `x` not found "
                                  "in $PATH: No such file or directory", status=127))
    assert missing.exit_code == 127 and "executable file not found" in str(missing)
    denied = _raised(ReadyReport(ok=False, error="open executable: Permission denied",
                                 status=126))
    assert denied.exit_code == 126 and "permission denied" in str(denied)
    other = _raised(ReadyReport(ok=False, error="no space", status=1))
    assert other.exit_code == 1 and str(other) == "no space"


def test_errors_go_to_the_log_as_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    log = tmp_path / "log.json"
    code = cli.main(["--root", str(tmp_path / "root"), "--log", str(log), "--log-format",
                     "json", "state", "missing"])
    assert code == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "missing does not exist" in entry["msg"]
    assert entry["time"].endswith("Z")
    assert capsys.readouterr().err == ""  # stderr may be the container's: nothing there
    assert cli.main(["--log", str(log), "--log-format", "json", "frobnicate"]) == 1
    assert "invalid choice" in json.loads(log.read_text().splitlines()[-1])["msg"]
    assert cli.main(["--root", str(tmp_path / "root"), "state", "missing"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_version_and_features(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert "spec: 1.3.0" in capsys.readouterr().out
    assert cli.main(["features"]) == 0
    features = json.loads(capsys.readouterr().out)
    assert "poststop" in features["hooks"] and features["ociVersionMax"] == "1.3.0"


def test_a_link_planted_beside_the_pid_file_is_never_written_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can write in the pid file's directory (the caller chose it)
    cannot redirect the write: a link at a temporary name, the old pid-based
    one or a random one, is skipped and left alone; a link at the pid file is
    replaced, not followed."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    pid_file = tmp_path / "pid"
    (tmp_path / f".pid.{os.getpid()}").symlink_to(victim)
    (tmp_path / ".pid.taken").symlink_to(victim)
    pid_file.symlink_to(victim)
    names = iter(["taken", "free"])
    monkeypatch.setattr("secrets.token_hex", lambda _n: next(names))
    verbs._write_pid_file(str(pid_file), 4242)
    assert victim.read_text() == "precious"
    assert not pid_file.is_symlink() and pid_file.read_text() == "4242"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644 & ~umask
    assert (tmp_path / ".pid.taken").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".pid.{os.getpid()}", ".pid.taken", "pid", "victim"]

    monkeypatch.setattr("secrets.token_hex", lambda _n: "taken")
    with pytest.raises(PykataError, match="temporary names beside it were taken") as err:
        verbs._write_pid_file(str(pid_file), 5151)
    assert err.value.hint and ".pid.*" in err.value.hint
    assert pid_file.read_text() == "4242" and victim.read_text() == "precious"


@pytest.mark.parametrize("after_create", ["changed", "removed"])
def test_delete_runs_the_poststop_hooks_create_was_given(tmp_path: Path,
                                                         after_create: str) -> None:
    """As runc runs the configuration it saved: a bundle changed (a poststop
    hook added) or removed after create does not change what delete runs."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def hook(name: str) -> dict[str, object]:
        return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {marks}/{name}"]}

    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = default_spec(["true"])
    spec["hooks"] = {"poststop": [hook("original")]}
    (bundle / "config.json").write_text(json.dumps(spec))
    store = Store(tmp_path / "root")
    args = argparse.Namespace(id="p1", bundle=str(bundle), preserve_fds=0, console_socket="",
                              debug=False)
    launch = verbs._prepare(args, store, foreground=False)
    write_state(launch.state_dir / "state.json", ContainerState(
        id="p1", bundle=str(bundle), status="stopped", sandbox_key="", run_root="",
        created="now", owner="", rootfs=str(bundle / "rootfs"), monitor_pid=1,
        monitor_start=1))
    if after_create == "changed":
        spec["hooks"] = {"poststop": [hook("added"), hook("original-changed")]}
        (bundle / "config.json").write_text(json.dumps(spec))
    else:
        shutil.rmtree(bundle)
    verbs._delete(store, "p1", force=False)
    assert sorted(p.name for p in marks.iterdir()) == ["original"]
    state = json.loads((marks / "original").read_text())
    assert state["id"] == "p1" and state["status"] == "stopped"
    assert store.ids() == []

