"""One VM per network namespace, without a VM: a sandbox refuses a namespace
a live sandbox mirrors (by identity, under any path, also when the other
recorded it while this one waited), records a mirror only once it exists,
and tcfilter's undo removes only what it added."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pykata import config as config_mod
from pykata.errors import HostError, HypervisorError, NetworkError
from pykata.network import tcfilter
from pykata.runtime import mirrors
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.runtime.state import SandboxState, process_start_time, read_state, write_state

# This process's own network namespace, by two paths: B asks by one, A recorded the other.
OWN_NETNS = Path(f"/proc/{os.getpid()}/ns/net")
OWN_NETNS_AGAIN = Path("/proc/self/ns/net")


class Scanned(Exception):
    """Raised by a stand-in scan: the start got past the mirror check."""


@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(tmp_path))
    # Nothing in these tests may reach a real namespace or mount anything.
    async def no_share(self: object) -> None:
        pass

    monkeypatch.setattr("pykata.runtime.resources.SharedFilesystem.prepare", no_share)
    return tmp_path


def _config() -> config_mod.Config:
    return dataclasses.replace(config_mod.Config(), qemu=dataclasses.replace(
        config_mod.Config().qemu, kernel="/nonexistent/vmlinux", initrd="/nonexistent/initrd"))


def _record(root: Path, key: str, *, alive: bool, netns: Path = OWN_NETNS_AGAIN,
            identity: tcfilter.NetnsId | None = None) -> None:
    """The state of sandbox `key` mirroring `netns` (its identity recorded,
    unless told otherwise), its owner this live process or a dead one."""
    ident = identity or tcfilter.netns_identity(netns)
    run_dir = root / "sandboxes" / key
    run_dir.mkdir(parents=True)
    write_state(run_dir / "state.json", SandboxState(
        id=key, key=key, front_end="oci", owner_pid=os.getpid() if alive else 2**22 + 7,
        owner_start=process_start_time(os.getpid()), console_log="", created=0.0,
        netns=str(netns), mirrored={"eth0": 2}, netns_dev=ident.dev, netns_ino=ident.ino))


def _endpoint() -> tcfilter.Endpoint:
    return tcfilter.Endpoint("eth0", 2, "02:00:00:00:00:01", 1400)


class NoBoot:
    """A VM source for a start that must not get as far as a VM: it records
    the sandbox's state as the boot would find it, then fails."""

    def __init__(self, paths: SandboxPaths | None = None) -> None:
        self.paths = paths
        self.seen: list[SandboxState] = []

    async def take(self, want: object) -> None:
        return None

    async def boot(self, config: object, name: str) -> Any:
        if self.paths is not None:
            self.seen.append(read_state(self.paths.state_file, SandboxState))
        raise HypervisorError("no VM in a unit test")


def _sandbox(netns: Path = OWN_NETNS, source: NoBoot | None = None) -> Sandbox:
    return Sandbox("pod-b", _config(), SandboxOptions(netns=str(netns)),
                   source=source or NoBoot())


def test_a_namespace_a_live_sandbox_mirrors_is_refused_before_anything_is_made(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _record(run_root, "pod-a", alive=True)

    def scan(path: Path) -> list[tcfilter.Endpoint]:
        raise AssertionError("the namespace was scanned: the refusal came late")

    monkeypatch.setattr(tcfilter, "scan", scan)
    with pytest.raises(NetworkError) as refused:
        asyncio.run(_sandbox().start())
    message = str(refused.value)
    assert f"network namespace {OWN_NETNS} is already mirrored into the VM of sandbox pod-a" \
        in message
    assert f"as {OWN_NETNS_AGAIN}" in message  # the other path, same namespace
    assert "a VM's network cannot be joined by another VM" in message
    assert "network namespace of its own" in message  # the hint: what to do
    assert not (run_root / "sandboxes" / "pod-b").exists()


def test_a_dead_sandboxs_record_or_another_namespace_is_no_refusal(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its leftover redirects, if any, are tcfilter's to refuse (naming
    `pykata cleanup`); another namespace's mirror is none of this one's."""
    _record(run_root, "dead", alive=False)
    _record(run_root, "elsewhere", alive=True, identity=tcfilter.NetnsId(1, 1))

    def scan(path: Path) -> list[tcfilter.Endpoint]:
        raise Scanned

    monkeypatch.setattr(tcfilter, "scan", scan)
    with pytest.raises(Scanned):
        asyncio.run(_sandbox().start())


def test_a_record_without_an_identity_is_matched_by_its_path(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state written before identities were kept still holds its namespace."""
    _record(run_root, "older", alive=True, identity=tcfilter.NetnsId(0, 0))
    monkeypatch.setattr(tcfilter, "scan", lambda path: [])
    with pytest.raises(NetworkError, match="VM of sandbox older"):
        asyncio.run(_sandbox().start())


def _fake_netlink(monkeypatch: pytest.MonkeyPatch, detached: list[Any]) -> None:
    monkeypatch.setattr(tcfilter, "scan", lambda path: [_endpoint()])
    monkeypatch.setattr(tcfilter, "detach_recorded",
                        lambda path, mirrored, expect=None: detached.append(
                            (path, mirrored, expect)))


def test_a_failed_attach_records_nothing_and_its_teardown_removes_nothing(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detached: list[Any] = []
    seen: list[SandboxState] = []
    _fake_netlink(monkeypatch, detached)

    def attach(path: Path, endpoints: list[tcfilter.Endpoint],
               expect: tcfilter.NetnsId | None = None) -> None:
        seen.append(read_state(run_root / "sandboxes" / "pod-b" / "state.json", SandboxState))
        raise NetworkError("tap name tap0_pykata is taken")

    monkeypatch.setattr(tcfilter, "attach", attach)
    with pytest.raises(NetworkError, match="taken"):
        asyncio.run(_sandbox().start())
    (state,) = seen
    assert state.mirrored == {} and state.netns == "", state  # not before it exists
    assert detached == [], "the failed start removed redirects it never made"
    assert not (run_root / "sandboxes" / "pod-b").exists()


def test_a_mirror_is_recorded_with_its_identity_once_made_and_removed_by_the_teardown(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detached: list[Any] = []
    _fake_netlink(monkeypatch, detached)
    monkeypatch.setattr(tcfilter, "attach", lambda path, endpoints, expect=None: None)
    source = NoBoot(SandboxPaths.for_key("pod-b"))
    with pytest.raises(HypervisorError):
        asyncio.run(_sandbox(source=source).start())
    identity = tcfilter.netns_identity(OWN_NETNS)
    (state,) = source.seen
    assert (state.netns, state.mirrored) == (str(OWN_NETNS), {"eth0": 2})
    assert (state.netns_dev, state.netns_ino) == (identity.dev, identity.ino)
    # Removed once, in the namespace recorded and no other.
    assert detached == [(OWN_NETNS, {"eth0": 2}, identity)]


def test_a_mirror_recorded_while_this_start_waited_is_refused_under_the_lock(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A and B start together: both pass the first check; A records its
    mirror first. B, checking again under the lock, is refused and attaches
    nothing."""
    detached: list[Any] = []
    attached: list[Any] = []
    _fake_netlink(monkeypatch, detached)

    def scan_while_a_records(path: Path) -> list[tcfilter.Endpoint]:
        _record(run_root, "pod-a", alive=True)
        return [_endpoint()]

    monkeypatch.setattr(tcfilter, "scan", scan_while_a_records)
    monkeypatch.setattr(tcfilter, "attach", lambda *a, **k: attached.append(a))
    with pytest.raises(NetworkError, match="VM of sandbox pod-a"):
        asyncio.run(_sandbox().start())
    assert attached == [] and detached == []
    assert [p.name for p in (run_root / "sandboxes").iterdir()] == ["pod-a"]


def test_the_mirror_lock_is_one_per_run_root_and_names_a_holder_that_hangs(
        tmp_path: Path) -> None:
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    with mirrors.exclusive(sandboxes):
        with pytest.raises(HostError, match=f"held the lock on {sandboxes} for 0.2 s"), \
                mirrors.exclusive(sandboxes, timeout=0.2):
            pass
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(_take(sandboxes)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # waits while the lock is held
    waiter.join(5)
    assert got == [True]  # and gets it once released


def _take(sandboxes: Path) -> bool:
    with mirrors.exclusive(sandboxes, timeout=5):
        return True


def test_a_start_cancelled_during_the_attach_lets_it_finish_and_undoes_it(
        run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pykata run` cancels its start on SIGINT: an attach running on a
    thread then still ends and is recorded, so the teardown removes it."""
    detached: list[Any] = []
    _fake_netlink(monkeypatch, detached)
    release = threading.Event()

    def slow_attach(path: Path, endpoints: list[tcfilter.Endpoint],
                    expect: tcfilter.NetnsId | None = None) -> None:
        release.wait(5)

    monkeypatch.setattr(tcfilter, "attach", slow_attach)

    async def start_then_cancel() -> None:
        task = asyncio.ensure_future(_sandbox().start())
        while not (run_root / "sandboxes" / "pod-b").exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.1)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(start_then_cancel())
    assert detached == [(OWN_NETNS, {"eth0": 2}, tcfilter.netns_identity(OWN_NETNS))]
    assert not (run_root / "sandboxes" / "pod-b").exists()


class FakeNetlink:
    """The netlink calls attach makes, in a namespace holding eth0 (2) and,
    once opened, tap0_pykata (7); `existing` qdiscs were there before."""

    def __init__(self, links: tuple[str, ...] = ("lo", "eth0"),
                 existing: tuple[int, ...] = (), failing_filter: int = 0) -> None:
        self.links = list(links)
        self.existing = set(existing)
        self.failing_filter = failing_filter
        self.added: list[int] = []
        self.deleted: list[int] = []

    def get_links(self) -> list[Any]:
        return [_Msg({"IFLA_IFNAME": name}, {}) for name in self.links]

    def link_lookup(self, ifname: str) -> list[int]:
        return [{"lo": 1, "eth0": 2, "tap0_pykata": 7}[ifname]]

    def link(self, *args: object, **kwargs: object) -> None:
        pass

    def tc(self, command: str, kind: str = "", index: int = 0, *args: object,
           **kwargs: object) -> list[Any]:
        if command == "dump":
            return [_Msg({"TCA_KIND": "ingress"}, {"index": i, "parent": tcfilter.TC_H_INGRESS})
                    for i in sorted(self.existing)]
        if command == "add":
            if index in self.existing or index in self.added:
                raise NetlinkError(errno.EEXIST, "File exists")
            self.added.append(index)
        elif command == "add-filter" and index == self.failing_filter:
            raise NetlinkError(errno.EINVAL, "Invalid argument")
        elif command == "del":
            self.deleted.append(index)
        return []


class _Msg(dict[str, Any]):
    def __init__(self, attrs: dict[str, Any], fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self._attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)


@pytest.fixture
def netns_file(tmp_path: Path) -> Path:
    """Stands for a namespace path: the netlink calls go to a FakeNetlink."""
    (tmp_path / "netns").touch()
    return tmp_path / "netns"


def _attach_in(ns: FakeNetlink, path: Path, monkeypatch: pytest.MonkeyPatch,
               existing_after_check: tuple[int, ...] = ()) -> tcfilter.Endpoint:
    """Run tcfilter.attach against `ns`; qdiscs in `existing_after_check`
    appear between its check and its adds (another VM racing)."""
    opened: list[int] = []

    def open_tap(path: Path, name: str) -> int:
        ns.links.append(name)
        ns.existing.update(existing_after_check)
        fd = os.open(os.devnull, os.O_RDONLY)
        opened.append(fd)
        return fd

    monkeypatch.setattr(tcfilter, "_open_tap", open_tap)
    monkeypatch.setattr(tcfilter, "_in_netns", lambda path, work, expect=None: work(ns))
    endpoint = _endpoint()
    try:
        tcfilter.attach(path, [endpoint])
    finally:
        for fd in opened:  # closed by the undo: closing again fails
            with pytest.raises(OSError):
                os.close(fd)
    return endpoint


def test_an_attach_that_fails_removes_only_the_qdiscs_it_added(
        netns_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tap side's filter fails: both qdiscs were added by this attach.
    ns = FakeNetlink(failing_filter=7)
    with pytest.raises(NetworkError, match="cannot redirect tap0_pykata to eth0"):
        _attach_in(ns, netns_file, monkeypatch)
    assert sorted(ns.deleted) == [2, 7]
    # Another VM adds eth0's qdisc between the check and the add: it stays.
    ns = FakeNetlink()
    with pytest.raises(NetworkError, match="cannot add an ingress qdisc to eth0"):
        _attach_in(ns, netns_file, monkeypatch, existing_after_check=(2,))
    assert ns.deleted == [], "the undo removed a qdisc it found"


def test_attach_refuses_a_namespace_with_pykatas_taps_or_a_qdisc_before_making_anything(
        netns_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for ns, reason in ((FakeNetlink(links=("lo", "eth0", "tap0_pykata")),
                        "holds interface tap0_pykata"),
                       (FakeNetlink(existing=(2,)), "interface eth0 has an ingress qdisc")):
        monkeypatch.setattr(tcfilter, "_open_tap", lambda path, name: pytest.fail("tap made"))
        monkeypatch.setattr(tcfilter, "_in_netns", lambda path, work, expect=None, ns=ns:
                            work(ns))
        endpoint = _endpoint()
        with pytest.raises(NetworkError, match=reason):
            tcfilter.attach(netns_file, [endpoint])
        assert ns.added == [] and ns.deleted == [] and not endpoint.own_qdiscs


def test_a_path_that_leads_elsewhere_now_is_not_entered() -> None:
    """A namespace path recreated since (or a /proc/PID reused): pykata does
    not work in it, and a dead owner's cleanup leaves it alone."""
    ran: list[bool] = []
    wrong = tcfilter.NetnsId(0, 1)
    with pytest.raises(tcfilter.NamespaceChanged, match="no longer the network namespace"):
        tcfilter._in_netns(OWN_NETNS, lambda ns: ran.append(True), wrong)
    assert ran == []
    tcfilter.detach_recorded(OWN_NETNS, {"eth0": 2}, wrong)  # nothing to do: no error


def test_the_state_keeps_the_namespace_identity(tmp_path: Path) -> None:
    paths = SandboxPaths("a", tmp_path)
    paths.run_dir.mkdir(parents=True)
    state = SandboxState(id="a", key="a", front_end="run", owner_pid=1, owner_start=2,
                         console_log="", created=0.0, netns="/run/netns/pod",
                         mirrored={"eth0": 2}, netns_dev=4, netns_ino=4026532000)
    write_state(paths.state_file, state)
    assert read_state(paths.state_file, SandboxState) == state
    assert mirrors.recorded_netns(state) == tcfilter.NetnsId(4, 4026532000)
    assert mirrors.recorded_netns(dataclasses.replace(state, mirrored={})) is None
