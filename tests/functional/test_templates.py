"""VM templates on real VMs: a sandbox restored from a template behaves as a
booted one, each clone is its own VM (randomness, clock, hostname, share),
changed settings or assets never use an old template, and a broken template
falls back to a cold boot that leaves nothing behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pykata import config
from pykata.factory import template as templates
from pykata.factory.sources import vm_source
from pykata.runtime.sandbox import Sandbox, SandboxOptions, read_sandbox_state
from tests.functional.conftest import Cli, qemu_processes, run_in_sandbox
from tests.functional.containerd_peer import IMAGE, NAMESPACE, RUNTIME, PrivateContainerd

CLOCK_LAG = 5.0


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("templates") / "root"


@pytest.fixture
def template_config(pykata_config: config.Config, template_dir: Path) -> config.Config:
    return dataclasses.replace(pykata_config, factory=config.FactoryConfig(
        enable_template=True, template_path=str(template_dir)))


async def _started(cfg: config.Config, sid: str, **options: object) -> Sandbox:
    sandbox = Sandbox(sid, cfg, SandboxOptions(hostname=sid, **options),  # type: ignore[arg-type]
                      source=vm_source(cfg))
    await sandbox.start()
    return sandbox


@pytest.fixture
async def clones(template_config: config.Config) -> AsyncIterator[list[Sandbox]]:
    """Two sandboxes from the module's template, restored at least
    CLOCK_LAG seconds after it was saved (so a clock left at the template's
    time shows)."""
    root = templates.template_root(template_config)
    if not templates.list_templates(root):
        warm_up = await _started(template_config, "clone-warm-up")
        await warm_up.stop()
    newest = max(t.created for t in templates.list_templates(root))
    await asyncio.sleep(max(0.0, newest + CLOCK_LAG - time.time()))
    started: list[Sandbox] = []
    try:
        for sid in ("clone-a", "clone-b"):
            started.append(await _started(template_config, sid))
        yield started
    finally:
        for sandbox in started:
            await sandbox.stop()


async def test_a_restored_sandbox_runs_containers_as_a_booted_one(
        clones: list[Sandbox], tmp_path: Path) -> None:
    sandbox = clones[0]
    assert sandbox.boot == "template" and read_sandbox_state(sandbox.paths).boot == "template"
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "in").write_text("from the host\n")
    run = await run_in_sandbox(
        sandbox, ["sh", "-c", "cat /v/in; echo out > /v/out; read line; echo got=$line; "
                              "echo to-stderr >&2; cat /etc/os-release | head -c0; exit 3"],
        container_id="c1", stdin=b"hello\n",
        mounts=[{"destination": "/v", "type": "bind", "source": str(volume),
                 "options": ["rbind", "rw"]}])
    assert run.exit_code == 3, run.stderr
    assert run.stdout == b"from the host\ngot=hello\n" and run.stderr == b"to-stderr\n"
    assert (volume / "out").read_text() == "out\n"
    # A second container in the same clone, and an exec into it.
    from pykata.assets.busybox_image import ensure_image
    from pykata.runtime.container import Container, overlay_rootfs
    from pykata.runtime.spec import default_spec

    container = Container(sandbox, "c2")
    try:
        container.share_rootfs(overlay_rootfs(ensure_image(), container.scratch()))
        await container.create(default_spec(["sleep", "600"]))
        await container.start()
        await container.exec("e1", default_spec(["sh", "-c", "exit 9"])["process"])
        assert await container.wait("e1") == 9
        await container.kill(9)
        assert await container.wait() == 137
    finally:
        await container.delete()


async def test_each_clone_is_its_own_vm(clones: list[Sandbox]) -> None:
    """Different random bytes and the host's time, in containers running in
    both clones at once (each on its own share)."""
    script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"
    runs = await asyncio.gather(*(
        run_in_sandbox(s, ["sh", "-c", script], container_id=f"id-{s.id}") for s in clones))
    now = time.time()
    outputs = [r.stdout.decode().split("\n") for r in runs]
    for sandbox, run, lines in zip(clones, runs, outputs, strict=True):
        assert run.exit_code == 0, run.stderr
        assert len(lines[0]) == 64
        # `date +%s` truncates, and the runs took a moment: 2 s of slack.
        assert abs(int(lines[1]) - now) <= 2, f"{sandbox.id}'s clock says {lines[1]}"
    assert outputs[0][0] != outputs[1][0], "two clones produced the same random bytes"
    # The kernel's generator itself differs (a random UUID is drawn in the
    # kernel): without the reseed, clones draw the same ones.
    ids = await asyncio.gather(*(run_in_sandbox(
        s, ["cat", "/proc/sys/kernel/random/uuid"], container_id=f"uuid-{s.id}")
        for s in clones))
    assert ids[0].stdout != ids[1].stdout


async def test_other_settings_or_a_rebuilt_asset_never_use_an_old_template(
        template_config: config.Config, tmp_path: Path) -> None:
    base = templates.template_root(template_config)
    # Its own copy of the initrd, so "rebuilding" it touches no other test.
    initrd = tmp_path / "initrd.img"
    from pykata import assets

    shutil.copy(assets.locate().initrd, initrd)
    cfg = dataclasses.replace(template_config, qemu=dataclasses.replace(
        template_config.qemu, initrd=str(initrd)), factory=dataclasses.replace(
        template_config.factory, template_shapes=("1:384",)))
    sandbox = await _started(cfg, "shape-a", memory_mib=384)
    await sandbox.stop()
    before = {t.key for t in templates.list_templates(base)}
    assert sandbox.boot == "template"
    # Same shape again: its template is reused, nothing new is built.
    sandbox = await _started(cfg, "shape-a2", memory_mib=384)
    await sandbox.stop()
    assert {t.key for t in templates.list_templates(base)} == before
    # A rebuilt initrd (same path, new file): the old template is never used
    # and goes at the next build.
    initrd.write_bytes(initrd.read_bytes())
    rebuilt = [t for t in templates.list_templates(base) if t.stale]
    assert len(rebuilt) == 1
    sandbox = await _started(cfg, "shape-b", memory_mib=384)
    await sandbox.stop()
    after = {t.key for t in templates.list_templates(base)}
    assert rebuilt[0].key not in after and len(after - before) == 1
    assert sandbox.boot == "template"


async def test_a_broken_template_falls_back_to_a_cold_boot(
        template_config: config.Config, caplog: pytest.LogCaptureFixture) -> None:
    sandbox = await _started(template_config, "warm-up")
    await sandbox.stop()
    [info] = [t for t in templates.list_templates(templates.template_root(template_config))
              if t.shape["memory_mib"] == template_config.qemu.default_memory]
    state = info.directory / "state"
    saved = state.read_bytes()
    state.write_bytes(saved[: len(saved) // 2])  # a state QEMU cannot load
    qemu_before = set(qemu_processes())
    try:
        with caplog.at_level(logging.WARNING, logger="pykata.factory.sources"):
            sandbox = await _started(template_config, "fallback")
        try:
            assert sandbox.boot == "cold"
            assert any("boots cold: restoring VM template" in r.getMessage()
                       for r in caplog.records), caplog.text
            run = await run_in_sandbox(sandbox, ["echo", "ok"], container_id="c1")
            assert run.stdout == b"ok\n"
            # The failed clone's QEMU is gone: only the cold VM runs.
            assert len(set(qemu_processes()) - qemu_before) == 1
        finally:
            await sandbox.stop()
    finally:
        state.write_bytes(saved)


async def test_a_template_with_metadata_of_other_settings_is_refused(
        template_config: config.Config) -> None:
    """A template whose record does not match its key (edited, or another
    pykata's) is not restored: the start rebuilds it."""
    sandbox = await _started(template_config, "meta-a")
    await sandbox.stop()
    [info] = [t for t in templates.list_templates(templates.template_root(template_config))
              if t.shape["memory_mib"] == template_config.qemu.default_memory]
    meta_file = info.directory / templates.META
    meta = json.loads(meta_file.read_text())
    meta["identity"]["vcpus"] = 3
    meta_file.write_text(json.dumps(meta))
    sandbox = await _started(template_config, "meta-b")
    await sandbox.stop()
    assert sandbox.boot == "template"
    assert json.loads(meta_file.read_text())["identity"]["vcpus"] == 1


async def test_templates_stay_within_their_bounds_and_starts_say_why_they_boot_cold(
        pykata_config: config.Config, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Real template VMs under template_max_count = 1: a shape the
    configuration does not list boots cold and builds nothing; a listed shape
    evicts the template used least recently; a start while a VM is restored
    from the only template can evict nothing and boots cold, saying which
    key to raise. One template on disk throughout, and every pod runs."""
    root = tmp_path / "templates"
    cfg = dataclasses.replace(pykata_config, factory=config.FactoryConfig(
        enable_template=True, template_path=str(root), template_shapes=("1:384",),
        template_max_count=1))

    def messages(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if words in r.getMessage()]

    async def start_and_run(sid: str, **options: object) -> Sandbox:
        sandbox = await _started(cfg, sid, **options)
        try:
            run = await run_in_sandbox(sandbox, ["echo", sid], container_id="c")
            assert run.stdout == f"{sid}\n".encode(), run
            assert len(templates.list_templates(root)) <= 1
        finally:
            await sandbox.stop()
        return sandbox

    with caplog.at_level(logging.INFO, logger="pykata.factory.sources"):
        unlisted = await start_and_run("bounds-unlisted", memory_mib=448)
        assert unlisted.boot == "cold" and not templates.list_templates(root)
        assert any("'1:448'" in m and "template_shapes" in m
                   for m in messages("boots cold")), caplog.text
        assert (await start_and_run("bounds-own")).boot == "template"
        [own] = templates.list_templates(root)
        assert (await start_and_run("bounds-listed", memory_mib=384)).boot == "template"
        [listed] = templates.list_templates(root)
        assert listed.key != own.key and listed.shape["memory_mib"] == 384
        assert listed.size_bytes <= cfg.factory.template_max_size * 2**20
        vm = Sandbox("probe", cfg, SandboxOptions(memory_mib=384)).vm_config()
        found, why = templates.find(root, vm)
        assert found is not None, why
        caplog.clear()
        async with templates.in_use(found):  # what a restore holds while QEMU loads it
            blocked = await start_and_run("bounds-blocked")
        assert blocked.boot == "cold"
        [line] = messages("boots cold")
        assert "template_max_count = 1" in line and "raise template_max_count" in line, line
        assert templates.find(root, vm)[0] == found
    # Restored from since: the template still serves pods of its shape.
    assert (await start_and_run("bounds-again", memory_mib=384)).boot == "template"


def test_destroy_leaves_a_template_being_built_which_then_ends_whole(
        cli: Cli, tmp_path: Path) -> None:
    """`factory destroy` while `factory init` is paused mid-build: the
    builder's lock and work directory stay (destroy says so and fails);
    the builder then finishes, and a start restores from its template."""
    root = tmp_path / "templates"
    conf = str(_config_file(tmp_path, root))
    builder = subprocess.Popen([sys.executable, "-m", "pykata.cli.main", "--config", conf,
                                "factory", "init"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob("*.new/memory")):
            assert time.monotonic() < deadline and builder.poll() is None, "no build began"
            time.sleep(0.05)
        os.kill(builder.pid, signal.SIGSTOP)  # its template VM keeps booting
        try:
            [lock] = root.glob("*.lock")
            held = lock.stat().st_ino
            destroyed = cli("--config", conf, "factory", "destroy", "--wait", "1")
            assert destroyed.returncode == 1, destroyed
            assert "left 1 VM template(s) in place" in destroyed.err, destroyed.err
            assert lock.stat().st_ino == held and list(root.glob("*.new/memory"))
        finally:
            os.kill(builder.pid, signal.SIGCONT)
        out, err = builder.communicate(timeout=180)
    finally:
        builder.kill()
        builder.wait()
    assert builder.returncode == 0 and "built in" in out, err
    [info] = templates.list_templates(root)
    assert not info.stale and not list(root.glob("*.new"))
    run = cli("--config", conf, "run", "--", "echo", "whole")
    assert run.returncode == 0 and run.out == "whole\n", run.err
    assert "boots cold" not in run.err
    assert "removed 1 template" in cli("--config", conf, "factory", "destroy").out
    assert not root.exists()


def _config_file(tmp_path: Path, template_root: Path) -> Path:
    path = tmp_path / "pykata.toml"
    path.write_text(f'[factory]\nenable_template = true\ntemplate_path = "{template_root}"\n')
    return path


def test_factory_command_line_builds_lists_and_destroys(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "templates"
    conf = str(_config_file(tmp_path, root))
    off = cli("factory", "init")
    assert off.returncode != 0 and "neither VM templates nor the VM cache are on" in off.err
    assert "no templates" in cli("--config", conf, "factory", "status").out
    built = cli("--config", conf, "factory", "init")
    assert built.returncode == 0 and "built in" in built.out, built.err
    status = cli("--config", conf, "factory", "status").out
    assert "ready" in status and "512 MiB" in status
    # A start through the command line restores from it.
    run = cli("--config", conf, "run", "--", "sh", "-c", "echo from-a-clone; exit 4")
    assert run.returncode == 4 and run.out == "from-a-clone\n", run.err
    assert "boots cold" not in run.err
    assert "removed 1 template" in cli("--config", conf, "factory", "destroy").out
    assert not root.exists()


def test_a_builder_killed_part_way_leaves_no_vm_and_cleanup_removes_its_files(
        cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "templates"
    conf = str(_config_file(tmp_path, root))
    def template_vms() -> list[str]:
        out = subprocess.run(["pgrep", "-af", f"mem-path={root}/"], capture_output=True,
                             text=True).stdout
        return [line for line in out.splitlines() if "qemu-system" in line]

    builder = subprocess.Popen([sys.executable, "-m", "pykata.cli.main", "--config", conf,
                                "factory", "init"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (list(root.glob("*.new/memory")) and template_vms()):
            assert time.monotonic() < deadline and builder.poll() is None, "no build began"
            time.sleep(0.05)
    finally:
        builder.kill()
        builder.wait()
    # The template VM died with its builder (PDEATHSIG).
    deadline = time.monotonic() + 10
    while template_vms() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not template_vms()
    assert list(root.glob("*.new"))
    assert "nothing to clean up" in cli("--config", conf, "cleanup", "--dry-run").out
    cleaned = cli("--config", conf, "cleanup")
    assert "removed the half-built VM template" in cleaned.out, cleaned.err
    assert not list(root.glob("*.new"))


def test_pods_through_containerd_start_from_the_template(
        containerd: PrivateContainerd, shim_config: Callable[[str], None],
        tmp_path: Path) -> None:
    """The shim's pods restore from the template: stdio and exit code through
    ctr, and the pod's sandbox records its start."""
    from pykata.runtime.keys import pod_key
    from pykata.runtime.paths import SandboxPaths

    shim_config(_config_file(tmp_path, tmp_path / "templates").read_text())
    first = containerd.run("tpl-first", "sh", "-c", "echo built; exit 5")
    assert first.returncode == 5 and first.out == "built\n", first.err
    assert len(templates.list_templates(tmp_path / "templates")) == 1
    cid = "tpl-second"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        paths = SandboxPaths.for_key(pod_key(str(containerd.socket), NAMESPACE, cid))
        assert read_sandbox_state(paths).boot == "template"
        execd = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c",
                               "echo exec-ok; exit 6")
        assert execd.returncode == 6 and execd.out == "exec-ok\n", execd.err
    finally:
        containerd.remove(cid)


def test_a_pod_with_a_network_starts_from_a_template_with_its_own_mac_and_address(
        cli: Cli, tmp_path: Path) -> None:
    """`pykata run --netns` from a template: the clone's NIC is on the pod's
    tap, with the pod's MAC (not the template's), address and MTU, and
    reaches a server beside the pod. Two pods of the same shape share the
    template; the second is restored, not booted."""
    from pykata.network import tcfilter
    from tests.functional.netns_tools import PEER_IP, POD_IP, greeting_server, pod_and_peer

    root = tmp_path / "templates"
    conf = str(_config_file(tmp_path, root))
    script = ("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; "
              "ip -o -4 addr show dev eth0 | awk '{print $4}'; "
              f"nc {PEER_IP} 8080")
    with pod_and_peer("tpl") as ns:
        (endpoint,) = tcfilter.scan(ns.path)
        for attempt in ("builds the template", "restores it"):
            with greeting_server(ns.peer):
                run = cli("--config", conf, "--debug", "run", "--netns", str(ns.path), "--",
                          "sh", "-c", script)
            assert run.returncode == 0, f"{attempt}: {run.err}"
            lines = run.out.split("\n")
            assert lines[0] == endpoint.mac and lines[1] == "1400", run.out
            assert lines[2] == f"{POD_IP}/24", run.out
            assert lines[3].startswith("hello "), run.out
            assert "boots cold" not in run.err, run.err
    [info] = templates.list_templates(root)
    assert info.directory.is_dir()


async def test_a_clone_writing_its_memory_changes_no_template_file(
        template_config: config.Config) -> None:
    """Root in a clone's guest fills its RAM: the writes land in the clone's
    private copy, never in the template's memory or state that every later
    clone maps and loads."""
    import hashlib

    warm_up = await _started(template_config, "hostile-warm-up")
    await warm_up.stop()
    [info] = [t for t in templates.list_templates(templates.template_root(template_config))
              if t.shape["memory_mib"] == template_config.qemu.default_memory]

    def digests() -> tuple[str, str]:
        return tuple(hashlib.sha256((info.directory / part).read_bytes()).hexdigest()
                     for part in ("memory", "state"))  # type: ignore[return-value]

    before = digests()
    sandbox = await _started(template_config, "hostile-clone")
    try:
        # /tmp is a tmpfs in the guest: its pages are guest RAM.
        run = await run_in_sandbox(sandbox, ["sh", "-c",
                                             "head -c 150000000 /dev/urandom > /tmp/fill && "
                                             "wc -c < /tmp/fill"], container_id="filler")
        assert run.stdout.strip() == b"150000000", run
        # The container's tmpfs is gone with it: the guest frees those pages,
        # and a free-page-reporting balloon would report them within seconds.
        await asyncio.sleep(6)
    finally:
        await sandbox.stop()
    assert digests() == before


def test_an_oci_container_in_a_network_namespace_starts_from_a_template(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_assets: object) -> None:
    """pykata-oci (what podman and docker run) with the spec naming a network
    namespace, as podman's does: restored from a template, with the pod's MAC,
    reaching a server beside it."""
    from pykata.network import tcfilter
    from pykata.runtime.spec import default_spec
    from tests.functional.netns_tools import PEER_IP, greeting_server, pod_and_peer
    from tests.functional.oci_tools import Oci, make_bundle

    root = tmp_path / "templates"
    monkeypatch.setenv("PYKATA_CONFIG", str(_config_file(tmp_path, root)))
    oci = Oci(tmp_path / "oci-root", log=tmp_path / "oci-log.json")
    with pod_and_peer("oci") as ns:
        (endpoint,) = tcfilter.scan(ns.path)
        linux = default_spec(["true"])["linux"]
        linux["namespaces"].append({"type": "network", "path": str(ns.path)})
        bundle = make_bundle(tmp_path / "b", [
            "sh", "-c", f"cat /sys/class/net/eth0/address; nc {PEER_IP} 8080"], linux=linux)
        with greeting_server(ns.peer):
            run = oci("run", "--bundle", str(bundle), "oci-builds")
        assert run.returncode == 0, (run, (tmp_path / "oci-log.json").read_text())
        mac, greeting = run.out.split("\n")[:2]
        assert mac == endpoint.mac and greeting.startswith("hello "), run.out
        assert len(templates.list_templates(root)) == 1
        # A second container, kept running: its sandbox records the restore.
        idle = make_bundle(tmp_path / "idle", ["sleep", "600"], linux=linux)
        created = oci("create", "--bundle", str(idle), "oci-restores")
        assert created.returncode == 0, (tmp_path / "oci-log.json").read_text()
        try:
            from pykata.runtime.paths import SandboxPaths

            key = json.loads((oci.root / "oci-restores" / "state.json").read_text())[
                "sandbox_key"]
            assert read_sandbox_state(SandboxPaths.for_key(key)).boot == "template"
        finally:
            assert oci("delete", "--force", "oci-restores").returncode == 0


async def test_starts_racing_for_a_missing_template_build_it_once(
        pykata_config: config.Config, tmp_path: Path) -> None:
    """Three sandboxes start at once with no template: one builds it (under
    its lock), the others boot cold meanwhile; all three run containers."""
    root = tmp_path / "templates"
    cfg = dataclasses.replace(pykata_config, factory=config.FactoryConfig(
        enable_template=True, template_path=str(root)))
    started = await asyncio.gather(*(_started(cfg, f"race-{i}") for i in range(3)),
                                   return_exceptions=True)
    sandboxes = [s for s in started if isinstance(s, Sandbox)]
    try:
        assert len(sandboxes) == 3, started
        runs = await asyncio.gather(*(run_in_sandbox(s, ["echo", s.id], container_id="c")
                                      for s in sandboxes))
        assert [r.stdout for r in runs] == [f"{s.id}\n".encode() for s in sandboxes]
        assert sorted(s.boot for s in sandboxes).count("template") >= 1
        assert len(templates.list_templates(root)) == 1
        assert not list(root.glob("*.new"))
    finally:
        for sandbox in sandboxes:
            await sandbox.stop()
