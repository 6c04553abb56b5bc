"""Fixtures for tests that boot real VMs: assets, the CLI, a shared sandbox, leak checks.

Every VM these tests boot is real: pykata's kernel and initrd under QEMU, the
agent inside, crun making the containers. The guest assets are built once per
machine (cached) by the `guest_assets` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata import assets, config
from pykata.runtime.paths import run_root
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from tests.functional.containerd_peer import PrivateContainerd
from tests.functional.netns_tools import network_leftovers

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


TEST_RUN_ROOTS = Path("/run/pykata-tests")


@pytest.fixture(scope="session", autouse=True)
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("functional tests boot VMs and mount filesystems: run them as root")


def _clear_run_root(root: Path) -> None:
    """Clear a test session's run root the way a user would: `pykata cleanup`
    against it (sandboxes whose owner died), then the emptied directories."""
    from pykata.cli.cleanup_cmd import stale_sandboxes
    from pykata.runtime.sandbox import cleanup_host_state

    for paths in stale_sandboxes(root):
        cleanup_host_state(paths)
    with contextlib.suppress(OSError):
        for socket in (root / "shims").glob("*"):
            socket.unlink()
    # rmdir, never rmtree: a directory still holding a mount must stay.
    for directory in (root / "sandboxes", root / "shims", root / "oci", root):
        with contextlib.suppress(OSError):
            directory.rmdir()


@pytest.fixture(scope="session", autouse=True)
def private_run_root(require_root: None) -> Iterator[Path]:
    """Each test session keeps pykata's state under a root of its own, so pods a
    user runs on this machine, or what a killed earlier session left, neither
    fail these tests nor get touched by them. Every pykata process the tests
    start (CLI, shims through containerd) inherits PYKATA_RUN_ROOT."""
    from pykata.runtime.state import process_alive, process_start_time

    if TEST_RUN_ROOTS.is_dir():
        for earlier in TEST_RUN_ROOTS.iterdir():
            if earlier.name.isdigit() and not process_alive(
                    int(earlier.name), process_start_time(int(earlier.name))):
                _clear_run_root(earlier)
    root = TEST_RUN_ROOTS / str(os.getpid())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYKATA_RUN_ROOT", str(root))
        yield root
    _clear_run_root(root)


SHARED_FS_ENV = "PYKATA_TEST_SHARED_FS"


def session_config_text() -> str:
    """The packaged configuration, with the shared filesystem the session
    asks for ($PYKATA_TEST_SHARED_FS: virtio-9p or virtio-fs; unset: the
    packaged "auto"), so a suite runs on either (scripts/test runs the
    guest-hostile suite on both)."""
    text = config.DEFAULT_CONFIG.read_text()
    wanted = os.environ.get(SHARED_FS_ENV, "")
    if wanted:
        if wanted not in ("virtio-9p", "virtio-fs"):
            pytest.fail(f"{SHARED_FS_ENV}={wanted!r}: use virtio-9p or virtio-fs")
        text, count = re.subn(r'^shared_fs = ".*"$', f'shared_fs = "{wanted}"', text,
                              flags=re.MULTILINE)
        assert count == 1, "the packaged configuration has no shared_fs line"
    return text


@pytest.fixture(scope="session", autouse=True)
def session_config(private_run_root: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[None]:
    """With $PYKATA_TEST_SHARED_FS, every pykata the tests start without a
    --config of their own reads the session's configuration ($PYKATA_CONFIG)."""
    if not os.environ.get(SHARED_FS_ENV):
        yield
        return
    path = tmp_path_factory.mktemp("session-config") / "configuration.toml"
    path.write_text(session_config_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYKATA_CONFIG", str(path))
        yield


@pytest.fixture(scope="session")
def guest_assets(require_root: None) -> assets.AssetPaths:
    """The kernel and initrd, built if out of date (the kernel takes minutes once)."""
    return assets.build(log=lambda line: print(f"assets: {line}", file=sys.stderr))


@pytest.fixture(scope="session")
def pykata_config(guest_assets: assets.AssetPaths) -> config.Config:
    return config.parse(tomllib.loads(session_config_text()), str(config.DEFAULT_CONFIG))


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


def pykata_cli(
    *args: str, input: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> CliResult:
    """Run the `pykata` command line as a user would, in a child process."""
    proc = subprocess.run(
        [sys.executable, "-m", "pykata.cli.main", *args],
        input=input, capture_output=True, timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


Cli = Callable[..., CliResult]


@pytest.fixture
def cli(guest_assets: assets.AssetPaths) -> Cli:
    """The `pykata` command line (assets built first)."""
    return pykata_cli


def qemu_processes() -> list[str]:
    """This session's QEMU processes: their 9p export lies under its run root,
    or (virtio-fs: no path on QEMU's command line) they inherited its
    PYKATA_RUN_ROOT from their owner."""
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-system.*-name pykata-"],
                         capture_output=True, text=True).stdout
    mine = f"PYKATA_RUN_ROOT={run_root()}".encode()
    return [line for line in out.splitlines() if f"path={run_root()}/" in line
            or mine in _environ(line.split()[0]).split(b"\0")]


def virtiofsd_processes() -> list[str]:
    """This session's virtiofsd processes (they serve an export under its run root)."""
    out = subprocess.run(["pgrep", "-a", "-f", "virtiofsd"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if f"source={run_root()}/" in line]


def _environ(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def shim_processes() -> list[str]:
    """This session's shim servers (they inherit its PYKATA_RUN_ROOT)."""
    out = subprocess.run(["pgrep", "-a", "-f", "pykata[.]shim .* serve"],
                         capture_output=True, text=True).stdout
    mine = f"PYKATA_RUN_ROOT={run_root()}".encode()
    return [line for line in out.splitlines()
            if line.strip() and mine in _environ(line.split()[0]).split(b"\0")]


def leftovers(allowed: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """QEMU and shim processes, mounts, state directories, taps and tc
    redirects (in test-made namespaces) pykata left behind."""
    found = network_leftovers()
    for line in qemu_processes():
        if not any(f"pykata-{sid} " in line + " " for sid in allowed):
            found.append(f"process: {line}")
    for line in virtiofsd_processes():
        if not any(f"/sandboxes/{sid}/" in line for sid in allowed):
            found.append(f"virtiofsd: {line}")
    found += [f"shim: {line}" for line in shim_processes()]
    root = run_root()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(str(root)) and not any(sid in point for sid in allowed):
                found.append(f"mount: {point}")
    found += [f"mount: {pin}" for pin in session_netns_pins()
              if not str(pin).startswith(str(root))]
    if root.exists():
        for entry in root.iterdir():
            if entry.name in ("sandboxes", "shims", "oci"):
                found += [f"state: {p}" for p in entry.iterdir() if p.name not in allowed]
            elif entry.name.startswith("debug-console.log"):
                pass  # the host's record of debug console sessions: kept on purpose
            else:
                found.append(f"state: {entry}")
    found += [f"cgroup: {path}" for path in cgroup_leftovers()]
    return found


def _in_use(cgroup: Path) -> bool:
    """Whether a process is in the cgroup or below: a running pod's (another
    test session's, at the same time, included), not a leak."""
    for directory, _, _ in os.walk(cgroup):
        try:
            if (Path(directory) / "cgroup.procs").read_text().strip():
                return True
        except OSError:
            continue
    return False


def cgroup_leftovers() -> list[Path]:
    """Host cgroups of the tests' pods: the cgroup test's own tops and the
    containerd test namespace's (`/pykata-test/<id>`), which the pods' owners
    made and must remove, once no process is in them. (An empty parent stays
    when two pods made it at once: each removes only what it made itself.)"""
    from pykata.host.cgroups import host_layout

    found = []
    for hierarchy in host_layout().hierarchies:
        for entry in hierarchy.mount.iterdir():
            if entry.is_dir() and (entry.name.startswith("pykata-cgtest-")
                                   or entry.name == "pykata-test"):
                found += [p for p in entry.iterdir() if p.is_dir() and not _in_use(p)]
    return found


def session_netns_pins() -> list[Path]:
    """The network namespaces pykata-oci containers of this session keep
    pinned in their directory (under a test's --root, outside the run root):
    the record names this run root or, before its first save, the sandbox
    lives under it. Other sessions' are theirs to count."""
    from pykata.oci.monitor import sandbox_key
    from pykata.oci.store import pinned_netns
    from pykata.runtime.state import ContainerState, StateFileError, read_state

    root = run_root()
    mine = []
    for pin in pinned_netns():
        try:
            record = read_state(pin.parent / "state.json", ContainerState)
        except StateFileError:
            key = sandbox_key(pin.parent, pin.parent.name)
            if (root / "sandboxes" / key).exists():
                mine.append(pin)
            continue
        if record.run_root == str(root):
            mine.append(pin)
    return mine


_shared_ids: set[str] = set()


def without_shared_sandboxes(points: list[str]) -> list[str]:
    """Mount points less the session's shared VM's. A mount namespace made
    while it runs (a peer's containerd) holds copies of its mounts until that
    namespace ends: they are not a leak of the test."""
    return [p for p in points if not any(f"/sandboxes/{sid}/" in p + "/" for sid in _shared_ids)]


def started_qemu_processes() -> list[str]:
    """`qemu_processes` less the session's shared VM: the ones tests start."""
    return [line for line in qemu_processes()
            if not any(f"pykata-{sid} " in line + " " for sid in _shared_ids)]


def unexpected_leftovers() -> list[str]:
    """What a test left behind: `leftovers`, the session's shared VM excepted."""
    return leftovers(_shared_ids)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test, for `vms_of_the_test` to see a failure."""
    report: pytest.TestReport = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every VM a test starts is the test's: after it, none of its QEMUs,
    shims, mounts or state may be left. When the test failed, what each of
    its pods left (console, QEMU's output, the saved state, the OCI monitor's
    log) is kept under test-artifacts/<test>/ first; what leaked is then
    ended and removed, so that one test's leak fails that test only."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        save_pod_logs(request.node.name)
    left = unexpected_leftovers()
    # A shim or monitor told to go may still be on its way out: a leak stays.
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = unexpected_leftovers()
    if left:
        save_pod_logs(f"{request.node.name}.leaked")
        end_leftovers()
    assert not left, "pykata left this behind:\n" + "\n".join(left)


_POD_LOGS = ("console.log", "console.log.1", "qemu.stderr", "virtiofsd.log", "state.json")


def save_pod_logs(test_name: str) -> None:
    """Copy what every sandbox of this session shows of itself, and each
    OCI container's monitor log, to test-artifacts/<test_name>/ (CI keeps it)."""
    target = ARTIFACTS / re.sub(r"[^\w.\[\]-]+", "_", test_name)
    root = run_root()
    for run_dir in sorted((root / "sandboxes").glob("*")) if root.is_dir() else []:
        for name in _POD_LOGS:
            source = run_dir / name
            if source.is_file() and not source.is_symlink():
                (target / run_dir.name).mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copyfile(source, target / run_dir.name / name)
    for log in Path("/tmp").glob("pytest-of-root/*/*/*/monitor.log"):
        with contextlib.suppress(OSError):
            if log.stat().st_mtime > time.time() - 600:
                (target / "oci").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, target / "oci" / f"{log.parent.name}.monitor.log")


def end_leftovers() -> None:
    """Kill the session's QEMUs and shims the test left (the shared VM's
    excepted) and remove the sandboxes whose owner is then gone."""
    from pykata.cli.cleanup_cmd import stale_sandboxes
    from pykata.runtime.sandbox import cleanup_host_state

    virtiofsds = [line for line in virtiofsd_processes()
                  if not any(f"/sandboxes/{sid}/" in line for sid in _shared_ids)]
    for line in [*started_qemu_processes(), *shim_processes(), *virtiofsds]:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    time.sleep(0.5)
    for paths in stale_sandboxes(run_root()):
        if paths.key not in _shared_ids:
            cleanup_host_state(paths)


@pytest.fixture(scope="session")
async def shared_sandbox(pykata_config: config.Config) -> AsyncIterator[Sandbox]:
    """One booted VM for the tests that only need a fresh container, not a fresh VM."""
    sandbox = Sandbox("shared-test-vm", pykata_config, SandboxOptions(vcpus=1, memory_mib=512))
    _shared_ids.add(sandbox.id)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.stop()
        _shared_ids.discard(sandbox.id)
        assert not leftovers(), "the shared sandbox left state behind"


def save_console(sandbox: Sandbox, name: str) -> None:
    """Keep a sandbox's console log for a failed test (CI uploads test-artifacts/)."""
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        (ARTIFACTS / f"{name}.console.log").write_bytes(sandbox.console_log.read_bytes())


async def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


@dataclass
class ContainerRun:
    exit_code: int
    stdout: bytes
    stderr: bytes


async def run_in_sandbox(
    sandbox: Sandbox, args: list[str], *, container_id: str, stdin: bytes | None = None,
    kill_after: float | None = None, kill_signal: int = 9,
    mounts: Sequence[dict[str, object]] = (),
) -> ContainerRun:
    """Run `args` in a new busybox container of `sandbox` (with `mounts` added to
    its spec); collect stdio and exit code."""
    from pykata.assets.busybox_image import ensure_image
    from pykata.runtime.container import Container, overlay_rootfs
    from pykata.runtime.spec import default_spec
    from pykata.runtime.stdio import StdioRelay

    image = ensure_image()
    container = Container(sandbox, container_id)
    out: list[bytes] = []
    err: list[bytes] = []

    async def to_out(data: bytes) -> None:
        out.append(data)

    async def to_err(data: bytes) -> None:
        err.append(data)

    pending = [stdin] if stdin is not None else []

    async def source() -> bytes:
        return pending.pop() if pending else b""

    assert sandbox.agent is not None
    try:
        container.share_rootfs(overlay_rootfs(image, container.scratch()))
        spec = default_spec(args)
        spec["mounts"].extend(mounts)
        await container.create(spec)
        relay = StdioRelay(sandbox.agent, container.id, container.id)
        relay.start(to_out, to_err, source if stdin is not None else None)
        await container.start()
        if kill_after is not None:
            await asyncio.sleep(kill_after)
            await container.kill(kill_signal)
        code = await asyncio.wait_for(container.wait(), 120)
        await relay.drain(30)
        await relay.close()
    finally:
        await container.delete()
    return ContainerRun(code, b"".join(out), b"".join(err))


@pytest.fixture(scope="session")
def containerd(
    guest_assets: assets.AssetPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateContainerd]:
    """A private containerd 1.6 with the busybox test image imported."""
    base = tmp_path_factory.mktemp("containerd")
    config_file = base / "pykata.toml"
    config_file.write_text(session_config_text())
    peer = PrivateContainerd(base, config_file)
    peer.start()
    try:
        peer.import_busybox()
        yield peer
    finally:
        peer.stop()
        _end_orphaned_shims()


def _end_orphaned_shims() -> None:
    """containerd leaves shims running when it stops; a test that failed half-way
    may have left one (and its VM). End them, so nothing of this session runs on."""
    import signal
    import time

    pids = [int(line.split()[0]) for line in shim_processes()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while shim_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    for line in shim_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.fixture
def shim_config(containerd: PrivateContainerd) -> Iterator[Callable[[str], None]]:
    """Replace the configuration the shims read (PYKATA_CONFIG) for one test."""
    original = containerd.pykata_config.read_text()

    def write(text: str) -> None:
        containerd.pykata_config.write_text(text)

    try:
        yield write
    finally:
        containerd.pykata_config.write_text(original)


def run_on_terminal(argv: list[str], rows: int, columns: int, until: bytes,
                    timeout: float = 120) -> tuple[str, int]:
    """Run `argv` on a new pseudo-terminal of the given size, as a user at a
    terminal would; return what it printed (until `until`) and its exit code."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    pid, master = pty.fork()
    if pid == 0:  # the child: becomes argv on the terminal
        os.execvp(argv[0], argv)
    output = b""
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        deadline = time.monotonic() + timeout
        while until not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)
