"""`pykata collect`: redaction, and the report over a pod on a fake VM."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.cli import collect_cmd
from pykata.collect.redact import REDACTED, Redactor
from pykata.collect.report import gather
from pykata.errors import PykataError
from pykata.runtime.container import bind_rootfs
from pykata.runtime.control import control_socket, serve_control
from tests.unit.pod_fakes import fake_pod, spec

SECRET = "hunter2-s3cr3t\"value\\"
ANNOTATED = "annotated-token-xyz"


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


def test_env_and_annotations_keep_names_only() -> None:
    r = Redactor()
    assert r.env(["PATH=/bin", "TOKEN=abc=def", "odd"]) == [
        f"PATH={REDACTED}", f"TOKEN={REDACTED}", REDACTED]
    assert r.annotations({"io.example/key": "v"}) == {"io.example/key": REDACTED}


def test_learned_values_go_everywhere_short_ones_are_left() -> None:
    """A value learned from a spec is taken out of any text (a console that
    printed it, a log quoting it); "1" would wreck the report, so it stays."""
    r = Redactor()
    r.learn_spec({"process": {"env": [f"DB_PASS={SECRET}", "DEBUG=1"]},
                  "annotations": {"a": ANNOTATED}})
    text = r.text(f"echo {SECRET} | tee x; token {ANNOTATED}; retry 1 of 3")
    assert SECRET not in text and ANNOTATED not in text
    assert text.count(REDACTED) == 2 and "retry 1 of 3" in text


def test_runtime_annotations_and_ids_are_not_hunted() -> None:
    """A CRI pod's sandbox id is an annotation value and the name the report
    gives the pod: it stays; the annotation itself is still shown redacted."""
    r = Redactor()
    r.learn_spec({"annotations": {"io.kubernetes.cri.sandbox-id": "abcdef123456",
                                  "io.example/token": ANNOTATED,
                                  "io.example/id": "mycontainer"}})
    r.keep(["mycontainer"])
    assert r.text("pod abcdef123456 container mycontainer " + ANNOTATED) == \
        f"pod abcdef123456 container mycontainer {REDACTED}"
    assert r.annotations({"io.kubernetes.cri.sandbox-id": "x"}) == {
        "io.kubernetes.cri.sandbox-id": REDACTED}


def test_assignments_of_upper_case_names_are_taken_out() -> None:
    """`NAME=value` in any text (an agent log quoting an env list, a process
    printing `env`); lower-case keys (kernel parameters, logfmt) stay."""
    r = Redactor()
    text = r.text('env: ["API_KEY=abc123", "X=1"] console=hvc0 level=error msg="x" '
                  "AWS_SECRET_ACCESS_KEY=zzz\n")
    assert "abc123" not in text and "zzz" not in text and "X=1" not in text
    assert f"API_KEY={REDACTED}" in text and f"AWS_SECRET_ACCESS_KEY={REDACTED}" in text
    assert "console=hvc0" in text and "level=error" in text


def test_a_hostile_spec_is_read_safely() -> None:
    r = Redactor()
    r.learn_spec({"process": {"env": [1, None, "A"]}, "annotations": ["not", "a", "map"]})
    r.learn_spec({"process": "nonsense"})
    assert r.text("A") == "A"


async def test_the_report_has_its_sections_and_no_secret(tmp_path: Path) -> None:
    """A pod whose container's env holds a secret, whose console printed it
    and whose event log quotes it: the report names the pod, its container,
    env names and annotation keys, and the secret appears nowhere, in the
    text or the JSON form."""
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    path = control_socket(pod.sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    pod.sandbox.set_control_socket(path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    container_spec = spec("sleep")
    container_spec["process"]["env"] = ["PATH=/bin", f"MY_SECRET={SECRET}"]
    container_spec["annotations"] = {"io.example/token": ANNOTATED}
    (bundle / "config.json").write_text(json.dumps(container_spec))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    mounts = bind_rootfs(rootfs)
    try:
        await pod.create_container("web", container_spec, lambda _c: mounts, io=None,
                                   bundle=str(bundle))
        pod.sandbox.console_log.write_text(
            f"boot\nsecret is {SECRET}\n\x1b[31mred\nKernel panic - fake\n")
        pod.events.add("rpc", f"ExecProcess failed: bad value {SECRET}", error=True)
        report = await gather(pod.sandbox.config)
        text, as_json = report.text(), report.to_json()
    finally:
        await server.aclose()
        await pod.stop()
    for title in ("pykata collect", "versions", "pykata check", "pykata env", "pods",
                  "pod pod1", "pod pod1: event log", "pod pod1: console", "recent errors"):
        assert f"===== {title}" in text, title
    assert "pykata: 0.1.0" in text and "qemu: " in text
    assert "front end: run" in text and "guest assets: current" in text
    assert "container web: created" in text
    assert f"env: PATH={REDACTED} MY_SECRET={REDACTED}" in text
    assert f'"io.example/token": "{REDACTED}"' in text
    assert "web: created" in text  # the event log
    assert "pod pod1: ExecProcess failed" in text  # recent errors
    assert "Kernel panic - fake" in text.split("===== recent errors")[1]
    assert "\x1b" not in text and "\\x1b[31mred" in text
    assert SECRET not in text and ANNOTATED not in text
    assert SECRET not in as_json and ANNOTATED not in as_json
    decoded = json.loads(as_json)
    assert decoded["pods"]
    assert not [line for lines in decoded.values() for line in lines
                if SECRET in line or ANNOTATED in line]


async def test_a_pod_whose_owner_is_gone_is_reported_from_its_state(tmp_path: Path) -> None:
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    try:
        report = await gather(pod.sandbox.config)  # no control socket served
    finally:
        await pod.stop()
    text = report.text()
    assert "===== pod pod1 =====" in text and "owner log: `pykata run` logs" in text


def test_output_is_a_private_new_file(tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    collect_cmd.write_private(out, b"x")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with pytest.raises(PykataError, match="exists"):
        collect_cmd.write_private(out, b"y")
    link = tmp_path / "link"
    os.symlink(tmp_path / "elsewhere", link)
    with pytest.raises(PykataError):
        collect_cmd.write_private(link, b"y")
    assert not (tmp_path / "elsewhere").exists()


def test_a_tarball_holds_both_forms(tmp_path: Path) -> None:
    out = tmp_path / "r.tar.gz"
    collect_cmd.write_private(out, collect_cmd.tarball("text", "{}"))
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["pykata-collect/report.json",
                                          "pykata-collect/report.txt"]
        member = tar.extractfile("pykata-collect/report.txt")
        assert member is not None and member.read() == b"text"


def _oci_record(directory: Path, key: str) -> None:
    from pykata.runtime.state import STATE_VERSION
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps(dict(
        id=directory.name, bundle="/", status="running", sandbox_key=key,
        run_root="/run/pykata", created="", owner="", rootfs="", version=STATE_VERSION)))


def test_oci_logs_follow_no_link_and_read_no_fifo(tmp_path: Path) -> None:
    """A monitor.log planted as a link to a root-only file is not read
    through, a FIFO does not hang collect, and a state.json that is a link
    is not trusted; each skip says why."""
    from pykata.collect.report import _oci_logs, _tail
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SALT$HASH:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    root = tmp_path / "oci"
    _oci_record(root / "linked", "k1")
    (root / "linked" / "monitor.log").symlink_to(secret)
    _oci_record(root / "fifo", "k1")
    os.mkfifo(root / "fifo" / "monitor.log")
    (root / "forged").mkdir()
    _oci_record(tmp_path / "elsewhere", "k1")
    (root / "forged" / "state.json").symlink_to(tmp_path / "elsewhere" / "state.json")
    logs, notes = _oci_logs("k1", [root])
    assert sorted(p.parent.name for p in logs) == ["fifo", "linked"]
    assert any("forged/state.json is a symbolic link" in n for n in notes), notes
    tails = {p.parent.name: _tail(p) for p in logs}
    assert "HASH" not in "".join(tails["linked"])
    assert "symbolic link: not followed" in tails["linked"][0]
    assert "not a regular file" in tails["fifo"][0]


def test_an_oci_root_others_can_write_or_files_of_another_user_are_skipped(
        tmp_path: Path) -> None:
    """An --oci-root another user can write in is not searched; a record or
    a log that belongs to another user is not read."""
    from pykata.collect.report import _oci_logs, _tail
    shared = tmp_path / "shared"
    _oci_record(shared / "c1", "k1")
    shared.chmod(0o777)
    logs, notes = _oci_logs("k1", [shared])
    assert logs == [] and any("not searched" in n and "writable" in n for n in notes), notes
    own = tmp_path / "own"
    _oci_record(own / "c1", "k1")
    _oci_record(own / "c2", "k1")
    os.chown(own / "c2" / "state.json", 4242, 4242)
    (own / "c1" / "monitor.log").write_text("hello\n")
    os.chown(own / "c1" / "monitor.log", 4242, 4242)
    logs, notes = _oci_logs("k1", [own])
    assert [p.parent.name for p in logs] == ["c1"]
    assert any("belongs to uid 4242" in n for n in notes), notes
    assert "belongs to uid 4242" in _tail(logs[0])[0]


def test_a_learned_value_goes_in_its_escaped_form_too() -> None:
    """The report shows guest text escaped: a learned value with a control
    character is taken out in that form too."""
    from pykata.untrusted import guest_line, guest_text
    r = Redactor()
    r.learn_spec({"annotations": {"x": "tok\x1bvalue\nline2"}})
    for shown in (guest_line("said tok\x1bvalue\nline2."), guest_text("tok\x1bvalue\nline2")):
        assert "value" not in r.text(shown), shown


def test_secret_looking_assignments_of_any_case_and_options_are_taken_out() -> None:
    """Nothing learned (the owner was gone): `api_key=`, `--password=` and
    a value with punctuation go whole; plain lower-case keys stay."""
    r = Redactor()
    text = r.text("DB_PASSWORD=hunter2;tail api_key=s3cr3tvalue --password=topsecret "
                  "-auth-token=abcd console=hvc0 level=error")
    for secret in ("hunter2", ";tail", "s3cr3tvalue", "topsecret", "abcd"):
        assert secret not in text, text
    assert f"--password={REDACTED}" in text and f"api_key={REDACTED}" in text
    assert "console=hvc0 level=error" in text


def test_an_oci_pod_whose_owner_is_gone_still_teaches_its_secrets(tmp_path: Path) -> None:
    """No owner to ask: the container's saved record names its bundle, whose
    spec's values are learned (and the annotations the record kept)."""
    from pykata.collect.report import _saved_specs
    from pykata.runtime.state import STATE_VERSION
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"process": {"args": ["sh"], "env": [f"plain={SECRET}"]}}))
    record = tmp_path / "oci" / "c1"
    record.mkdir(parents=True)
    (record / "state.json").write_text(json.dumps(dict(
        id="c1", bundle=str(bundle), status="stopped", sandbox_key="k1",
        run_root="/run/pykata", created="", owner="", rootfs="",
        annotations={"io.example/token": ANNOTATED}, version=STATE_VERSION)))
    r = Redactor()
    lines = _saved_specs("k1", [tmp_path / "oci"], r)
    assert any("container c1 (its saved record)" in line for line in lines), lines
    assert r.text(f"console: {SECRET} and {ANNOTATED}") == f"console: {REDACTED} and {REDACTED}"
