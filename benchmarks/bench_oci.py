"""Benchmark: `pykata-oci` against runc on the same bundle, and `docker run` with each.

Three figures, each pykata one beside the baseline measured in the same run,
the two alternated run by run (the order swapped every run) so that load from
elsewhere on the machine hits both alike:

1. `create` + `start` + wait for the container's exit + `delete` of a busybox
   bundle whose process is `true`, through `pykata-oci` and through
   /usr/sbin/runc (same config.json, same rootfs). As containerd's runc shim
   does, this process is a child subreaper: `create` writes the pid to wait
   for (pykata's monitor, runc's container init) to --pid-file, and that pid,
   reparented here when `create` exits, is waited for with waitpid.
2. The latency of `state ID` of a running container (podman calls it often).
3. `docker run --rm --network none IMAGE true` with `--runtime pykata` and with
   docker's default runc, against a private dockerd (tests/oci/docker_peer.py).

With --baseline CHECKOUT (another pykata's checkout with its .venv), that
pykata's `pykata-oci` takes runc's place in all three, for before/after
figures from one run.

One untimed warm-up of each runtime comes before 1 and 3. Everything made is
removed on the way out, also after a failure or Ctrl-C: containers, the
private dockerd and its containerd, mounts, QEMU processes, temporary dirs.

    .venv/bin/python -m benchmarks.bench_oci [--runs 10] [--baseline DIR]   (as root, from
    the repository root)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pykata.assets.busybox_image import ensure_image
from pykata.runtime.spec import default_spec

RUNC = Path("/usr/sbin/runc")
PYKATA_OCI = Path(sys.executable).with_name("pykata-oci")
PR_SET_CHILD_SUBREAPER = 36
PHASES = ("create", "start", "wait for exit", "delete")
TIMEOUT = 300.0


class BenchError(Exception):
    """A step failed; the message says which, with what the runtime said."""


# -- figures ----------------------------------------------------------------------


@dataclass
class Series:
    """Samples of one figure for one runtime; `error` once the runtime failed."""

    samples: list[float] = field(default_factory=list)
    error: str = ""

    def median(self) -> float:
        return statistics.median(self.samples)

    def text(self) -> str:
        if self.error:
            return "failed"
        if not self.samples:
            return "-"
        unit = unit_for(self.median())
        return (f"{number(self.median(), unit)} {unit} "
                f"({number(min(self.samples), unit)}-{number(max(self.samples), unit)})")


def unit_for(seconds: float) -> str:
    return "s" if seconds >= 1 else "ms"


def number(seconds: float, unit: str) -> str:
    if unit == "s":
        return f"{seconds:.2f}"
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def fmt(seconds: float) -> str:
    """Seconds as `3.10 s`, `45 ms` or `4.6 ms`."""
    unit = unit_for(seconds)
    return f"{number(seconds, unit)} {unit}"


def ratio(pykata: Series, base: Series) -> str:
    if pykata.error or base.error or not pykata.samples or not base.samples \
            or base.median() <= 0:
        return "-"
    value = pykata.median() / base.median()
    return f"{value:.0f}x" if value >= 10 else f"{value:.1f}x"


def table(title: str, rows: Sequence[tuple[str, Series, Series]], names: tuple[str, str]) -> None:
    print(f"\n{title}\n")
    label_w = max(len(r[0]) for r in rows)
    cells = [(label, a.text(), b.text()) for label, a, b in rows]
    a_w = max(len(names[0]), *(len(c[1]) for c in cells))
    b_w = max(len(names[1]), *(len(c[2]) for c in cells))
    print(f"  {'':<{label_w}}  {names[0]:<{a_w}}  {names[1]:<{b_w}}  ratio")
    for (label, a, b), (_, a_text, b_text) in zip(rows, cells, strict=True):
        print(f"  {label:<{label_w}}  {a_text:<{a_w}}  {b_text:<{b_w}}  {ratio(a, b)}")
    for label, a, b in rows:
        for name, series in zip(names, (a, b), strict=True):
            if series.error:
                print(f"\n  {label}, {name} failed:\n    "
                      + series.error.strip().replace("\n", "\n    "))


# -- waiting for a pid as a subreaper -----------------------------------------------


class Reaper:
    """This process as a child subreaper: orphans of `create` become its children."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)

    def set(self, on: bool) -> None:
        if self._libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def reap_orphans(self) -> None:
        """Collect whatever child has ended (only call with no subprocess running)."""
        while True:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.statuses[pid] = os.waitstatus_to_exitcode(raw)

    def wait_exit(self, pid: int, timeout: float = TIMEOUT) -> int:
        """The exit status of child `pid`, waited for without polling."""
        if pid in self.statuses:
            return self.statuses.pop(pid)
        fd = os.pidfd_open(pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise BenchError(f"pid {pid} did not exit within {timeout:.0f} s")
        finally:
            os.close(fd)
        _, raw = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(raw)


def is_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()


# -- the two runtimes through the same verbs -------------------------------------------


class Runtime:
    """`BINARY --root ROOT --log LOG VERB ...`, the way containerd's runc shim calls it."""

    def __init__(self, name: str, binary: Path, root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.binary = binary
        self.root = root
        self.log = root.with_name(f"{root.name}.log")
        self.env = env
        self.ids: list[str] = []  # created and not yet deleted
        self.pids: dict[str, int] = {}

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), "--root", str(self.root), "--log", str(self.log), *args]

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-5:])
        return ""

    def call(self, *args: str, timeout: float = TIMEOUT) -> str:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout, env=self.env)
        if result.returncode != 0:
            raise BenchError(f"{self.name} {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.strip()} {self._log_tail()}".strip())
        return result.stdout

    def create(self, cid: str, bundle: Path) -> int:
        """`create` with stdio of /dev/null; the pid its --pid-file names."""
        pid_file = bundle / f"{cid}.pid"
        self.ids.append(cid)
        code = subprocess.run(self.argv("create", "--bundle", str(bundle), "--pid-file",
                                        str(pid_file), cid),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=TIMEOUT, env=self.env,
                              start_new_session=True).returncode
        if code != 0:
            raise BenchError(f"{self.name} create {cid} exited {code}: {self._log_tail()}")
        pid = int(pid_file.read_text())
        pid_file.unlink()
        self.pids[cid] = pid
        return pid

    def delete(self, cid: str, force: bool = False) -> None:
        self.call("delete", *(["--force"] if force else []), cid)
        self.ids.remove(cid)
        self.pids.pop(cid, None)

    def cleanup(self, reaper: Reaper) -> None:
        for cid in list(self.ids):
            with contextlib.suppress(BenchError, subprocess.SubprocessError, ValueError):
                self.delete(cid, force=True)
        for pid in self.pids.values():
            if is_child(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        reaper.reap_orphans()


def lifecycle(rt: Runtime, reaper: Reaper, bundle: Path, cid: str) -> list[float]:
    """Seconds of create, start, the wait for the exit, delete; the exit must be 0."""
    marks = [time.monotonic()]
    pid = rt.create(cid, bundle)
    marks.append(time.monotonic())
    rt.call("start", cid)
    marks.append(time.monotonic())
    status = reaper.wait_exit(pid)
    marks.append(time.monotonic())
    if status != 0:
        raise BenchError(f"{rt.name}: the pid of {cid} exited {status}, not 0")
    rt.delete(cid)
    marks.append(time.monotonic())
    reaper.reap_orphans()
    return [b - a for a, b in itertools.pairwise(marks)]


def make_bundle(where: Path, args: list[str]) -> Path:
    """A runc-accepted bundle (`runc spec`-style, terminal false, RLIMIT_NOFILE 1024,
    under the machine's hard limit of 20000) with a copy of the busybox rootfs."""
    where.mkdir(parents=True)
    shutil.copytree(ensure_image(), where / "rootfs", symlinks=True)
    spec = default_spec(args)
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    (where / "config.json").write_text(json.dumps(spec, indent=2))
    return where


def alternate(i: int, pair: tuple[Runtime, Runtime]) -> tuple[Runtime, Runtime]:
    return pair if i % 2 == 0 else (pair[1], pair[0])


def bench_lifecycle(pair: tuple[Runtime, Runtime], reaper: Reaper, bundle: Path,
                    runs: int) -> dict[str, list[Series]]:
    series = {rt.name: [Series() for _ in (*PHASES, "whole")] for rt in pair}
    for rt in pair:
        lifecycle(rt, reaper, bundle, f"warmup-{rt.name}")
    for i in range(runs):
        for rt in alternate(i, pair):
            phases = lifecycle(rt, reaper, bundle, f"bench-{rt.name}-{i}")
            for s, value in zip(series[rt.name], [*phases, sum(phases)], strict=True):
                s.samples.append(value)
        print(f"lifecycle {i + 1}/{runs}: " + ", ".join(
            f"{rt.name} {fmt(series[rt.name][-1].samples[-1])}" for rt in pair), file=sys.stderr)
    return series


def bench_state(pair: tuple[Runtime, Runtime], reaper: Reaper, bundle: Path,
                calls: int) -> dict[str, Series]:
    series = {rt.name: Series() for rt in pair}
    cid = "bench-state"
    for rt in pair:
        rt.create(cid, bundle)
        rt.call("start", cid)
    for i in range(calls):
        for rt in alternate(i, pair):
            start = time.monotonic()
            out = rt.call("state", cid)
            series[rt.name].samples.append(time.monotonic() - start)
            status = json.loads(out).get("status")
            if status != "running":
                raise BenchError(f"{rt.name} state {cid}: status {status!r}, not running")
    for rt in pair:
        pid = rt.pids[cid]
        rt.call("kill", cid, "KILL")
        reaper.wait_exit(pid)
        rt.delete(cid)
    reaper.reap_orphans()
    print(f"state: {calls} calls each", file=sys.stderr)
    return series


# -- docker -----------------------------------------------------------------------------


def bench_docker(tmp: Path, runtime_env: dict[str, str], runs: int,
                 stop: list[Callable[[], None]], baseline: Path | None = None
                 ) -> dict[str, Series]:
    """`docker run --rm --network none IMAGE true`, pykata against runc (or
    against the `baseline` pykata-oci)."""
    other = "baseline" if baseline is not None else "runc"
    series = {"pykata": Series(), other: Series()}
    try:
        from tests.oci.docker_peer import RUNTIME_NAME, DockerPeer, missing_tools
        from tests.oci.images import write_docker_archive
    except ImportError as exc:
        for s in series.values():
            s.error = f"the docker harness (tests/oci) cannot be imported: {exc}"
        return series
    if missing := missing_tools():
        for s in series.values():
            s.error = f"missing: {', '.join(missing)}"
        return series
    peer = DockerPeer(PYKATA_OCI, runtime_env=runtime_env,
                      more_runtimes={"pykatabase": baseline} if baseline else None)
    stop.append(lambda: stop_peer(peer))
    try:
        peer.start()
        print(f"docker: private dockerd at {peer.socket} (storage {peer.storage_driver})",
              file=sys.stderr)
        peer.load_image(write_docker_archive(tmp / "busybox-docker.tar"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        for s in series.values():
            s.error = f"the private dockerd: {exc}"
        return series
    runtime_args = {"pykata": ["--runtime", RUNTIME_NAME], "runc": [],
                    "baseline": ["--runtime", "pykatabase"]}

    def one(name: str) -> None:
        s = series[name]
        if s.error:
            return
        start = time.monotonic()
        result = peer.docker("run", "--rm", "--network", "none", *runtime_args[name],
                             peer.image, "true", timeout=TIMEOUT)
        elapsed = time.monotonic() - start
        if result.returncode != 0:
            s.error = (f"docker run exited {result.returncode}: "
                       f"{result.stderr.decode(errors='replace').strip()}")
        else:
            s.samples.append(elapsed)

    for name in series:  # warm-up
        one(name)
        series[name].samples.clear()
    names = tuple(series)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            one(name)
        print(f"docker run {i + 1}/{runs}: " + ", ".join(
            f"{n} {fmt(s.samples[-1]) if s.samples and not s.error else 'failed'}"
            for n, s in series.items()), file=sys.stderr)
    return series


def stop_peer(peer: Any) -> None:
    peer.stop()
    left = peer.leftovers(settle=0)
    if left:
        print(f"warning: the docker peer left behind: {left}", file=sys.stderr)


# -- cleanup ---------------------------------------------------------------------------


def mounts_under(base: Path) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix[:-1] or p.startswith(prefix)]


def clear_run_root(root: Path, reaper: Reaper) -> None:
    """pykata's state under this benchmark's own run root: QEMU processes, mounts, dirs."""
    from pykata.cli.cleanup_cmd import stale_sandboxes
    from pykata.runtime.sandbox import cleanup_host_state

    found = subprocess.run(["pgrep", "-f", f"(qemu-system|virtiofsd).*(path|source)={root}/"],
                           capture_output=True, text=True).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    if found:
        time.sleep(0.5)
        reaper.reap_orphans()
        print(f"warning: killed {len(found)} QEMU process(es) left under {root}",
              file=sys.stderr)
    for paths in stale_sandboxes(root):
        cleanup_host_state(paths)
    remove_tree(root)


def remove_tree(path: Path) -> None:
    """rmtree, never through a mount."""
    if not path.exists():
        return
    if left := mounts_under(path):
        print(f"warning: {path} kept, mounts remain under it: {left}", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C, through the cleanup."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    with _handling((signal.SIGTERM, signal.SIGHUP), handler):
        yield


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """The cleanup is not cut short by a second Ctrl-C (or SIGTERM, SIGHUP).
    A handler, not SIG_IGN, so the processes it runs get the default action."""
    def handler(signum: int, frame: FrameType | None) -> None:
        print(f"bench_oci: {signal.Signals(signum).name} ignored while cleaning up",
              file=sys.stderr)

    with _handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), handler):
        yield


@contextlib.contextmanager
def _handling(signums: tuple[signal.Signals, ...],
              handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- main --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--state-calls", type=int, default=30)
    parser.add_argument("--no-docker", action="store_true", help="skip the docker figure")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another pykata's checkout: its pykata-oci instead of runc")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: containers need it")
    base_bin = (args.baseline.resolve() / ".venv" / "bin" / "pykata-oci"
                if args.baseline else RUNC)
    base_name = "baseline" if args.baseline else "runc"
    for binary in (base_bin, PYKATA_OCI):
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"{binary} is missing")
    reaper = Reaper()
    tmp = Path(tempfile.mkdtemp(prefix="pykata-bench-oci-"))
    os.chmod(tmp, 0o755)
    run_root = Path(tempfile.mkdtemp(prefix="pykata-bench-", dir="/run"))
    env = {**os.environ, "PYKATA_RUN_ROOT": str(run_root)}
    runtime_env = {k: v for k, v in env.items() if k.startswith("PYKATA_")}
    pair = (Runtime("pykata-oci", PYKATA_OCI, tmp / "pykata-root", env),
            Runtime(base_name, base_bin, tmp / f"{base_name}-root", env))
    stops: list[Callable[[], None]] = []
    life: dict[str, list[Series]] = {}
    state: dict[str, Series] = {}
    docker: dict[str, Series] = {}
    try:
        with signals_interrupt():
            try:
                reaper.set(True)
                life = bench_lifecycle(pair, reaper, make_bundle(tmp / "true", ["true"]),
                                       args.runs)
                state = bench_state(pair, reaper, make_bundle(tmp / "sleep", ["sleep", "600"]),
                                    args.state_calls)
            finally:
                with shielded():
                    for rt in pair:
                        rt.cleanup(reaper)
                    reaper.set(False)
                    reaper.reap_orphans()
            if not args.no_docker:
                docker = bench_docker(tmp, runtime_env, args.runs, stops,
                                      base_bin if args.baseline else None)
    except BenchError as exc:
        print(f"bench_oci: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_oci: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        with shielded():
            for stop in reversed(stops):
                try:
                    stop()
                except Exception as exc:  # the rest must still be cleared
                    print(f"warning: stopping the docker peer: {exc}", file=sys.stderr)
            clear_run_root(run_root, reaper)
            remove_tree(tmp)
    names = ("pykata-oci", base_name)
    table(f"create + start + wait for exit + delete, process `true`, busybox bundle, "
          f"median of {args.runs} (min-max):",
          [(phase, life["pykata-oci"][k], life[base_name][k])
           for k, phase in enumerate((*PHASES, "whole"))], names)
    table(f"`state ID` of a running container, median of {args.state_calls} calls (min-max):",
          [("state", state["pykata-oci"], state[base_name])], names)
    rows = [("create+start+wait+delete", life["pykata-oci"][-1], life[base_name][-1]),
            ("state of a running container", state["pykata-oci"], state[base_name])]
    if docker:
        table(f"docker run --rm --network none IMAGE true, median of {args.runs} (min-max):",
              [("docker run", docker["pykata"], docker[base_name])], ("pykata", base_name))
        rows.append(("docker run --rm ... true", docker["pykata"], docker[base_name]))
    table(f"summary (pykata against {base_name}, same run, alternated):", rows,
          ("pykata", base_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
