"""A private dockerd (Debian's docker.io 20.10) for driving a runc-compatible runtime.

Everything it makes lives under one directory, /tmp/pykata-oci-peers-docker-*:
its own containerd (started here, not by dockerd: dockerd 20.10 silently uses
the machine's containerd whenever /run/containerd/containerd.sock exists, and
its managed containerd would create /opt/containerd), data root, exec root,
socket, CLI config, trust key and cgroup parent (named after the directory).
The runtime under test is registered as `pykata`; docker calls it through
containerd's runc shim (io.containerd.runc.v2 with BinaryName set to it).

The helpers at the end (processes, mounts and cgroups under a directory) are
shared with podman_peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

PEERS_PREFIX = "pykata-oci-peers-"
RUNTIME_NAME = "pykata"
NAMESPACE = "pykata-oci"
# docker.io 20.10 speaks API 1.41. A newer client (docker-ce-cli 28 is in
# /usr/local/bin here) negotiates down to it by itself; pinning it keeps any
# client on the API these tests were written against.
API_VERSION = "1.41"
# containerd 1.6 puts every shim's socket here whatever its state dir is.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# dockerd 20.10 creates this plugin directory unconditionally.
PLUGIN_DIR = Path("/run/docker/plugins")

_CONTAINERD_CONFIG = """\
version = 2
root = "{base}/containerd/root"
state = "{base}/containerd/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{base}/containerd/containerd.sock"
[ttrpc]
  address = ""
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/containerd/opt"
"""

_CLIENT_ENV_DROP = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS", "DOCKER_TLS_VERIFY",
                    "DOCKER_CERT_PATH", "DOCKER_CONFIG", "DOCKER_API_VERSION")


def docker_client() -> str:
    """The docker CLI to use: a 20.10 client if there is one (Debian's docker.io
    installs it as /usr/bin/docker, but /usr/local/bin may hold a newer one
    that comes first on PATH), else whatever `docker` is."""
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c]
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            version = subprocess.run([candidate, "--version"], capture_output=True,
                                     text=True, timeout=30).stdout
            if "version 20.10." in version:
                return candidate
    return candidates[0] if candidates else "docker"


def missing_tools() -> list[str]:
    """What this peer needs and the machine lacks, as Debian package hints."""
    wanted = {"dockerd": "docker.io", "docker": "docker.io", "containerd": "containerd",
              "containerd-shim-runc-v2": "containerd"}
    return sorted({f"{tool} ({pkg})" for tool, pkg in wanted.items() if not shutil.which(tool)})


class DockerPeer:
    def __init__(self, runtime: Path, *, runtime_env: Mapping[str, str] | None = None,
                 storage_driver: str | None = None, parent: Path = Path("/tmp"),
                 more_runtimes: Mapping[str, Path] | None = None) -> None:
        """`more_runtimes`: other runtimes dockerd offers besides pykata's
        (name: runc-compatible binary), for a benchmark's baseline."""
        self.runtime = runtime
        self.more_runtimes = dict(more_runtimes or {})
        self.base = make_base("docker", runtime, parent)
        self.tag = self.base.name  # cgroup parent: unique, and names this peer's dirs
        self.socket = self.base / "docker.sock"
        self.data_root = self.base / "data"
        self.exec_root = self.base / "exec"
        self.containerd_socket = self.base / "containerd" / "containerd.sock"
        self.log = self.base / "dockerd.log"
        self.containerd_log = self.base / "containerd.log"
        self.storage_driver = storage_driver or ("vfs" if fs_type(self.base) == "overlay"
                                                 else "overlay2")
        self.runtime_env = dict(runtime_env or {})
        self.client = docker_client()
        self.image = ""
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        self._baseline_mounts: set[str] = set()
        self._made_plugin_dir = not PLUGIN_DIR.exists()

    # -- life cycle -------------------------------------------------------------

    def dockerd_argv(self) -> list[str]:
        return [
            "dockerd",
            "--config-file", str(self.base / "daemon.json"),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "dockerd.pid"),
            "-H", f"unix://{self.socket}",
            "--containerd", str(self.containerd_socket),
            "--containerd-namespace", NAMESPACE,
            "--containerd-plugins-namespace", f"{NAMESPACE}-plugins",
            "--bridge", "none",
            "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            # the default turns on net.ipv4.ip_forward for the whole machine
            "--ip-forward=false",
            "--userland-proxy=false",
            "--storage-driver", self.storage_driver,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", f"/{self.tag}",
            "--add-runtime", f"{RUNTIME_NAME}={self.runtime}",
            *(arg for name, path in self.more_runtimes.items()
              for arg in ("--add-runtime", f"{name}={path}")),
            "--log-level", "debug",
        ]

    def daemon_argv(self, argv: list[str]) -> list[str]:
        """How containerd, then dockerd, is started: as is (a subclass may
        wrap it, to run the daemons in namespaces of their own)."""
        return argv

    def start(self, timeout: float = 90) -> None:
        # 20.10 has no flag for its libtrust key; without this it writes
        # /etc/docker/key.json.
        (self.base / "daemon.json").write_text(
            json.dumps({"deprecated-key-path": str(self.base / "key.json")}))
        config = self.base / "containerd" / "config.toml"
        config.parent.mkdir()
        config.write_text(_CONTAINERD_CONFIG.format(base=self.base))
        daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        # The shims and the runtime are children of containerd and get its
        # environment; TMPDIR keeps the shims' exec process files and console
        # sockets (else /tmp/runc-process*, /tmp/pty*/) inside this peer.
        (self.base / "tmp").mkdir()
        shim_env = {**daemon_env, "TMPDIR": str(self.base / "tmp"), **self.runtime_env}
        with open(self.containerd_log, "wb") as log:
            self.containerd = subprocess.Popen(
                self.daemon_argv(["containerd", "--config", str(config)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=shim_env)
        self._wait(lambda: self.containerd_socket.is_socket(), self.containerd, timeout,
                   f"containerd did not start; see {self.containerd_log}")
        with open(self.log, "wb") as log:
            self.dockerd = subprocess.Popen(self.daemon_argv(self.dockerd_argv()),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=daemon_env)
        self._wait(lambda: self.docker("info", timeout=30).returncode == 0, self.dockerd,
                   timeout, f"dockerd did not answer `docker info`; see {self.log}")
        server = self.docker("version", "--format", "{{.Server.Version}}").stdout.decode()
        if not server.startswith("20.10."):
            raise RuntimeError(f"expected docker 20.10, the daemon says {server!r}")
        self._baseline_mounts = set(mounts_under(self.base))

    @staticmethod
    def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float,
              message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(message)
            time.sleep(0.2)

    def load_image(self, archive: Path) -> str:
        from tests.oci.images import load_archive

        self.image = load_archive(self.docker, archive)
        return self.image

    def stop(self, keep_logs: Path | None = None) -> None:
        """Remove every container, stop dockerd and containerd, then clear
        whatever is left of this peer on the machine and remove its directory
        (the daemons' logs copied to keep_logs first)."""
        if self.dockerd is not None and self.dockerd.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError):
                ids = self.docker("ps", "-aq", timeout=60).stdout.decode().split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=300)
        for proc in (self.dockerd, self.containerd):
            if proc is not None:
                terminate(proc)
        self._baseline_mounts = set()
        if keep_logs is not None:
            keep(keep_logs, "docker", [self.log, self.containerd_log])
        clear_base(self.base, self.tag)
        if self._made_plugin_dir:
            # empty unless someone installed a plugin meanwhile; then it stays
            for directory in (PLUGIN_DIR, PLUGIN_DIR.parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    # -- the CLI ------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The CLI's environment: this daemon, a CLI config of its own."""
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}
        return {**env, "DOCKER_HOST": f"unix://{self.socket}",
                "DOCKER_CONFIG": str(self.base / "cli"), "DOCKER_API_VERSION": API_VERSION}

    def argv(self, *args: str) -> list[str]:
        return [self.client, *args]

    def docker(self, *args: str, input: bytes | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, env=self.env,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def container_ids(self) -> list[str]:
        result = self.docker("ps", "-aq", "--no-trunc", timeout=60)
        return result.stdout.decode().split()

    # -- what is left -------------------------------------------------------------

    def leftovers(self, settle: float = 10.0) -> list[str]:
        """What this peer has on the machine beyond an idle daemon (or, once
        stopped, anything at all): containers, processes whose command line or
        working directory is under its directory or that sit in its cgroups,
        mounts under its directory, the runtime's container state, cgroups.
        Asked again for up to `settle` seconds, since shims exit just after
        `docker run --rm` returns."""
        return settled(self._leftovers, settle)

    def _leftovers(self) -> list[str]:
        found: list[str] = []
        running = self.dockerd is not None and self.dockerd.poll() is None
        daemons = {p.pid for p in (self.dockerd, self.containerd)
                   if p is not None and p.poll() is None}
        if running:
            found += [f"container {cid}" for cid in self.container_ids()]
        found += [f"process {pid}: {cmd}"
                  for pid, cmd in processes_under(self.base, self.tag) if pid not in daemons]
        found += [f"mount {m}" for m in mounts_under(self.base)
                  if m not in self._baseline_mounts]
        found += [f"cgroup {c}" for c in cgroup_dirs(self.tag, children_only=running)]
        state = self.exec_root / "runtime-runc" / NAMESPACE
        if state.is_dir():
            found += [f"runtime state {p}" for p in sorted(state.iterdir())]
        if not running and self.base.exists():
            found.append(f"directory {self.base}")
        return found


# -- helpers shared with podman_peer ----------------------------------------------


def make_base(kind: str, runtime: Path, parent: Path = Path("/tmp")) -> Path:
    """A fresh directory for one peer, with a note of its owner so a later
    session can clear it if this one dies without cleaning up (reap_stale)."""
    base = Path(tempfile.mkdtemp(prefix=f"{PEERS_PREFIX}{kind}-", dir=parent))
    (base / "owner.json").write_text(json.dumps({
        "pid": os.getpid(), "start": _start_time(os.getpid()), "kind": kind,
        "runtime": str(runtime)}))
    return base


def keep(directory: Path, kind: str, files: list[Path]) -> None:
    """Copies of a peer's logs, for reading after its directory is gone."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        with contextlib.suppress(OSError):
            shutil.copyfile(f, directory / f"{kind}-{f.name}")


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def reap_stale(parent: Path = Path("/tmp")) -> list[Path]:
    """Clear the directories of peers whose owning test session is gone."""
    reaped: list[Path] = []
    for base in sorted(parent.glob(f"{PEERS_PREFIX}*")):
        try:
            owner = json.loads((base / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if _start_time(int(owner["pid"])) == owner["start"]:
            continue  # its session is still running
        if owner.get("kind") == "podman":
            delete_runtime_containers(Path(owner["runtime"]), base)
        clear_base(base, base.name)
        reaped.append(base)
    return reaped


def fs_type(path: Path) -> str:
    """The type of the filesystem holding path (the longest mount point above it)."""
    best, kind = "", ""
    target = str(path.resolve())
    for fields in _mountinfo():
        point = fields[4]
        fstype = fields[fields.index("-") + 1]
        if (target == point or target.startswith(point.rstrip("/") + "/")) and \
                len(point) >= len(best):
            best, kind = point, fstype
    return kind


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mountinfo(pid: str = "self") -> list[list[str]]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [[_unescape(x) for x in line.split()] for line in f]


def mounts_under(base: Path, pid: str = "self") -> list[str]:
    """Mount points at or below base, in mount order (duplicates kept), as
    process pid sees them (its mount namespace)."""
    prefix = str(base).rstrip("/")
    return [f[4] for f in _mountinfo(pid) if f[4] == prefix or f[4].startswith(prefix + "/")]


def unmount_under(base: Path) -> None:
    for _ in range(10):
        points = mounts_under(base)
        if not points:
            return
        for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)


def _cgroup_roots() -> list[Path]:
    roots = []
    for fields in _mountinfo():
        if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):
            roots.append(Path(fields[4]))
    return roots


def cgroup_dirs(tag: str, children_only: bool = False) -> list[Path]:
    """The cgroup directories named tag (at the top of each hierarchy) and below
    them, deepest first."""
    found: list[Path] = []
    for root in _cgroup_roots():
        top = root / tag
        if top.is_dir():
            found += [Path(d) for d, _, _ in os.walk(top)]
            if children_only:
                found.remove(top)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(tag: str) -> set[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(tag):
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    return pids


def processes_under(base: Path, tag: str) -> list[tuple[int, str]]:
    """Processes whose command line or working directory names base, or that are
    in the cgroups called tag; the test process itself excluded."""
    needle = str(base)
    in_cgroups = cgroup_pids(tag)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            cwd = os.readlink(entry / "cwd") if needle not in cmdline else needle
        except OSError:
            continue
        if not cmdline:  # kernel thread or zombie
            continue
        if needle in cmdline or cwd == needle or cwd.startswith(needle + "/") or \
                int(entry.name) in in_cgroups:
            found.append((int(entry.name), cmdline[:300]))
    return sorted(found)


def _shim_socket(cmdline: str) -> Path | None:
    """Where a containerd 1.6 runc shim with this command line has its socket."""
    words = cmdline.split()
    if not words or not words[0].endswith("containerd-shim-runc-v2"):
        return None
    opts = dict(zip(words[1::2], words[2::2], strict=False))
    if not {"-namespace", "-id", "-address"} <= opts.keys():
        return None
    key = os.path.join(opts["-address"], opts["-namespace"], opts["-id"])
    return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()


def kill_processes(base: Path, tag: str, timeout: float = 20) -> None:
    """SIGKILL what processes_under finds until nothing is left (a killed shim's
    container, reparented, is found through its cgroup)."""
    deadline = time.monotonic() + timeout
    while (found := processes_under(base, tag)) and time.monotonic() < deadline:
        for pid, cmdline in found:
            socket = _shim_socket(cmdline)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    socket.unlink()
        time.sleep(0.2)


def remove_cgroups(tag: str) -> None:
    for directory in cgroup_dirs(tag):
        with contextlib.suppress(OSError):
            directory.rmdir()


def clear_base(base: Path, tag: str) -> None:
    """Kill, unmount, remove cgroups, then delete base. Never rmtree through a
    mount: if one stays, base stays too and leftovers() says so."""
    kill_processes(base, tag)
    unmount_under(base)
    remove_cgroups(tag)
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)


def delete_runtime_containers(runtime: Path, base: Path, root: Path | None = None) -> None:
    for state in runtime_containers_under(runtime, base, root):
        subprocess.run(_runtime_argv(runtime, root, "delete", "--force", str(state["id"])),
                       capture_output=True, timeout=120)


def _runtime_argv(runtime: Path, root: Path | None, *args: str) -> list[str]:
    return [str(runtime), *(["--root", str(root)] if root else []), *args]


def runtime_containers_under(runtime: Path, base: Path,
                             root: Path | None = None) -> list[dict[str, object]]:
    """The runtime's own list of containers (`list --format json`) whose bundle
    is under base: state a runtime kept after its container was deleted."""
    if not runtime.exists():
        return []
    try:
        result = subprocess.run(_runtime_argv(runtime, root, "list", "--format", "json"),
                                capture_output=True, timeout=60)
        listed = json.loads(result.stdout or b"null") or []
    except (subprocess.SubprocessError, ValueError, OSError):
        return []
    prefix = str(base) + "/"
    return [c for c in listed
            if isinstance(c, dict) and str(c.get("bundle", "")).startswith(prefix)]


def terminate(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after grace seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settled(check: Callable[[], list[str]], settle: float) -> list[str]:
    deadline = time.monotonic() + settle
    while (found := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found
