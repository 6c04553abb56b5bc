"""A private containerd 1.6 with its CRI plugin, in a network namespace of its own.

Everything the peer makes lives under one directory, /tmp/pykata-cri-*:
containerd's root, state and socket, the CNI configuration, host-local's
address leases, libcni's cache, the pods' logs, the pause image. Its network
namespace and its cgroup parent are named after that directory.

containerd is started as

    ip netns exec pykata-cri-XXXX unshare --mount --propagation private sh launch.sh

so the CNI bridge, the pods' veths, the portmap rules and the streaming
server's port all live in the test's namespace (no test address ever appears
in the machine's own), and every mount containerd, its shims and pykata's VMs
make stays in a mount namespace of its own. `ip netns exec` mounts a new
/sys for the namespace, which hides the cgroup hierarchies: launch.sh mounts
them again as the host has them, binds a directory of the peer over
/var/lib/cni (libcni's cache) and a hosts file of the peer over /etc/hosts
(the file containerd copies into each pod), then execs containerd. Its gRPC
socket is a unix socket, reachable from the test process in the host's
namespace.

The CRI runtime handlers are `runc` (the reference) and `pykata`
(io.containerd.pykata.v2, from this virtualenv's bin directory on
containerd's PATH). Pods get their addresses from a bridge network of CNI's
plugins (Debian's containernetworking-plugins under /usr/lib/cni): loopback,
bridge with host-local addresses from SUBNET, portmap for host ports.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pykata.assets.busybox_image import write_oci_archive
from pykata.runtime.state import process_alive, process_start_time
from tests.oci.docker_peer import (
    cgroup_dirs,
    kill_processes,
    mounts_under,
    processes_under,
    remove_cgroups,
    unmount_under,
)

PREFIX = "pykata-cri-"
NAMESPACE = "k8s.io"  # the containerd namespace of the CRI plugin
BUSYBOX_IMAGE = "docker.io/pykata/busybox:test"
PAUSE_IMAGE = "docker.io/pykata/pause:test"
# pykata-template: pykata with VM templates on (pods restored from a template).
RUNTIME_HANDLERS = ("runc", "pykata", "pykata-template")
SMALL_MEMORY = 256  # MiB, the pykata-small handler's VM size
SUBNET = "10.88.77.0/24"
GATEWAY = "10.88.77.1"  # the bridge's address, in the peer's network namespace
BRIDGE = "pkcri0"
NETWORK_NAME = "pykata-cri"
# A name the peer's hosts file gives the gateway: pods get a copy of that file.
GATEWAY_NAME = "cri-gateway.pykata.test"
HOSTS = f"""\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
{GATEWAY}\t{GATEWAY_NAME} cri-gateway
"""
PAUSE_SOURCE = Path(__file__).with_name("pause.c")
CNI_CACHE = Path("/var/lib/cni")  # libcni's cache: the peer binds a directory of its own here

_CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{socket}"
[ttrpc]
  address = ""
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # No CAP_SYS_RESOURCE here: runc may not lower a process's OOM score.
  restrict_oom_score_adj = true
  # The pods' network namespaces are mounted under the state directory.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # The streaming server listens on the peer namespace's loopback.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]
      runtime_type = "io.containerd.pykata.v2"
      pod_annotations = ["io.katacontainers.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata.options]
        ConfigPath = "{pykata_config}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata-template]
      runtime_type = "io.containerd.pykata.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata-template.options]
        ConfigPath = "{base}/pykata-template.toml"
    # A second pykata handler whose ConfigPath names a configuration of its own.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata-small]
      runtime_type = "io.containerd.pykata.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata-small.options]
        ConfigPath = "{base}/pykata-small.toml"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base}/cni/net.d"
    max_conf_num = 1
"""


def cni_conflist(base: Path) -> dict[str, object]:
    """loopback, a bridge network with host-local addresses, host ports by portmap."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {"type": "loopback"},
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(base / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# -- images ---------------------------------------------------------------------


def build_pause(out: Path) -> Path:
    """The pause program (pause.c), linked statically."""
    binary = out / "pause"
    result = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(binary),
                             str(PAUSE_SOURCE)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cannot build the pause program (build-essential installed?):\n"
                           f"{result.stderr}")
    return binary


def write_image_archive(archive: Path, reference: str, files: Mapping[str, tuple[bytes, int]],
                        entrypoint: Sequence[str], user: str = "") -> Path:
    """An OCI image-layout tar (for `ctr image import`) of one layer holding
    `files` (path in the image -> content, mode) and nothing else, named
    `reference`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()

    def digest(data: bytes) -> str:
        return f"sha256:{hashlib.sha256(data).hexdigest()}"

    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "WorkingDir": "/",
                   **({"User": user} if user else {})},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_bytes)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer_bytes), "size": len(layer_bytes)}],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": reference},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }).encode()
    entries = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)]
    entries += [(f"blobs/{digest(b).replace(':', '/')}", b)
                for b in (config, manifest, layer_bytes)]
    with tarfile.open(archive, "w") as out:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return archive


# -- the cgroup hierarchies, as the host has them ---------------------------------


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space) decoded."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def cgroup_mount_script(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Shell lines that mount again what the host has at /sys/fs/cgroup and
    below (a tmpfs with v1 hierarchies and a v2 one in it, or one v2 hierarchy),
    with the host's options, and recreate the symlinks of the top directory."""
    lines: list[str] = []
    top = Path("/sys/fs/cgroup")
    for raw in mountinfo.read_text().splitlines():
        fields = [_unescape(f) for f in raw.split()]
        point = fields[4]
        if point != str(top) and not point.startswith(f"{top}/"):
            continue
        dash = fields.index("-")
        fstype, source, super_options = fields[dash + 1], fields[dash + 2], fields[dash + 3]
        options = ",".join(dict.fromkeys(fields[5].split(",") + super_options.split(",")))
        lines.append(f"mkdir -p '{point}'")
        lines.append(f"mount -t {fstype} -o '{options}' '{source}' '{point}'")
        if point == str(top) and fstype == "tmpfs":
            lines += [f"ln -s '{os.readlink(link)}' '{link}'"
                      for link in sorted(top.iterdir()) if link.is_symlink()]
    if not lines:
        raise RuntimeError("the host has no cgroup hierarchy at /sys/fs/cgroup")
    return lines


# -- the peer ---------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_exists(name: str) -> bool:
    listing = _ip("netns", "list").stdout.split("\n")
    return any(line.split()[:1] == [name] for line in listing)


def netns_exec_argv(netns: str, *argv: str) -> list[str]:
    """argv run in the peer's network namespace (for clients on its addresses)."""
    return ["ip", "netns", "exec", netns, *argv]


class CriPeer:
    def __init__(self, pykata_config_text: str, parent: Path = Path("/tmp")) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        # The directory's name is also the network namespace's and the cgroup parent's.
        self.tag = self.base.name
        self.netns = self.tag
        self.socket = self.base / "containerd.sock"
        self.state = self.base / "state"
        self.log = self.base / "containerd.log"
        self.logs = self.base / "logs"  # the pods' log directories
        self.pykata_config = self.base / "pykata.toml"
        self.pykata_config.write_text(pykata_config_text)
        # The pykata-small handler's: VMs of SMALL_MEMORY MiB.
        small = pykata_config_text.replace("default_memory = 512",
                                           f"default_memory = {SMALL_MEMORY}")
        assert small != pykata_config_text, "the default configuration has no default_memory"
        (self.base / "pykata-small.toml").write_text(small)
        # The pykata-template handler's: VM templates on, kept under the peer's base.
        templated = pykata_config_text.replace(
            "enable_template = false", "enable_template = true").replace(
            'template_path = ""', f'template_path = "{self.base}/templates"')
        assert "enable_template = true" in templated
        (self.base / "pykata-template.toml").write_text(templated)
        # A mount point is needed for libcni's cache; one the peer had to make
        # goes again with the peer.
        self.made_cni_cache = not CNI_CACHE.exists()
        (self.base / "owner.json").write_text(json.dumps({
            "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "netns": self.netns, "run_root": os.environ.get("PYKATA_RUN_ROOT", ""),
            "made_cni_cache": self.made_cni_cache}))
        self.proc: subprocess.Popen[bytes] | None = None
        self._ns_mounts_at_stop: list[str] = []

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.tag}"

    # -- start --------------------------------------------------------------------

    def start(self) -> None:
        base = self.base
        for sub in ("cni/net.d", "cni/ipam", "cni/cache", "logs", "root", "state", "opt"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "cni" / "net.d" / "10-pykata-cri.conflist").write_text(
            json.dumps(cni_conflist(base), indent=2))
        (base / "hosts").write_text(HOSTS)
        CNI_CACHE.mkdir(parents=True, exist_ok=True)
        config = base / "config.toml"
        config.write_text(_CONFIG.format(base=base, socket=self.socket,
                                         pause_image=PAUSE_IMAGE,
                                         pykata_config=self.pykata_config))
        launch = base / "launch.sh"
        launch.write_text("\n".join([
            "#!/bin/sh",
            "# In the peer's network and mount namespaces: the cgroup hierarchies",
            "# `ip netns exec` hid, libcni's cache and the pods' hosts file, containerd.",
            "set -eu",
            *cgroup_mount_script(),
            f"mount --bind '{base}/cni/cache' '{CNI_CACHE}'",
            f"mount --bind '{base}/hosts' /etc/hosts",
            f"exec containerd --config '{config}'",
            "",
        ]))
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")
        path = os.environ.get("PATH", "") or "/usr/sbin:/usr/bin:/sbin:/bin"
        for system in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                       "/sbin", "/bin"):
            if system not in path.split(":"):
                path += f":{system}"
        # The shims inherit this: pykata's from the virtualenv, with the
        # session's PYKATA_* settings (its run root among them).
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{path}",
               "PYKATA_CONFIG": str(self.pykata_config)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_exec_argv(self.netns, "unshare", "--mount", "--propagation", "private",
                                "sh", str(launch)),
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while self.ctr("version").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def ctr(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.socket), "-n", NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def import_image(self, archive: Path) -> None:
        result = self.ctr("image", "import", str(archive))
        if result.returncode != 0:
            raise RuntimeError(f"ctr image import {archive.name}: {result.stderr}")

    def import_images(self) -> None:
        """The pause image (built here) and the busybox test image.

        The pause image is laid out as Kubernetes' own (registry.k8s.io/pause):
        the one file /pause, run as 65535:65535. No /proc, /dev or /etc: the
        runtime makes the mount points, under a root CRI makes read-only."""
        images = self.base / "images"
        images.mkdir(exist_ok=True)
        pause = build_pause(images)
        self.import_image(write_image_archive(
            images / "pause-oci.tar", PAUSE_IMAGE, {"pause": (pause.read_bytes(), 0o755)},
            ["/pause"], user="65535:65535"))
        self.import_image(write_oci_archive(images / "busybox-oci.tar", BUSYBOX_IMAGE))

    # -- in the peer's namespaces -------------------------------------------------

    @property
    def pid(self) -> int:
        """containerd's pid (ip, unshare and sh exec, so it is the one started)."""
        assert self.proc is not None
        return self.proc.pid

    def namespace_mounts(self, *roots: Path) -> list[str]:
        """Mount points in containerd's mount namespace at or below roots (the
        peer's directory when none are given)."""
        prefixes = [str(r).rstrip("/") for r in (roots or (self.base,))]
        try:
            with open(f"/proc/{self.pid}/mountinfo") as f:
                points = [_unescape(line.split()[4]) for line in f]
        except OSError:
            return []
        return [p for p in points
                if any(p == prefix or p.startswith(prefix + "/") for prefix in prefixes)]

    def pod_netns(self) -> list[Path]:
        """The pods' network namespaces containerd has (mounted under its state)."""
        directory = self.state / "io.containerd.grpc.v1.cri" / "netns"
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def in_netns(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run argv in the peer's network namespace, as a client on the node would."""
        return subprocess.run(netns_exec_argv(self.netns, *argv), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    # -- stop ---------------------------------------------------------------------

    def stop(self, keep_logs: Path | None = None) -> None:
        """Stop containerd and everything it left, delete the namespace, the
        cgroups and the directory. What could not be cleared stays for
        `leftovers` to report."""
        if self.proc is not None and self.proc.poll() is None:
            self._ns_mounts_at_stop = self.namespace_mounts()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log, keep_logs / "containerd.log")
            with contextlib.suppress(OSError):
                shutil.copytree(self.logs, keep_logs / "pods", dirs_exist_ok=True)
        clear(self.base, self.tag, self.netns, self.made_cni_cache)

    def leftovers(self) -> list[str]:
        """After stop: what of the peer is still on the machine."""
        found = [f"mount in containerd's namespace: {m}" for m in self._ns_mounts_at_stop]
        found += [f"process {pid}: {cmd}" for pid, cmd in processes_under(self.base, self.tag)]
        found += [f"host mount: {m}" for m in mounts_under(self.base)]
        found += [f"cgroup: {c}" for c in cgroup_dirs(self.tag)]
        if netns_exists(self.netns):
            found.append(f"network namespace {self.netns}")
        if self.made_cni_cache and CNI_CACHE.exists():
            found.append(f"directory {CNI_CACHE} (made by the peer)")
        if self.base.exists():
            found.append(f"directory {self.base}")
        return found


def clear(base: Path, tag: str, netns: str, made_cni_cache: bool = False) -> None:
    """End a peer's processes and remove its namespace, cgroups, mounts and
    directory (and libcni's cache directory, if the peer made it)."""
    kill_processes(base, tag)
    if netns_exists(netns):
        for pid in _ip("netns", "pids", netns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", netns, check=False)
    remove_cgroups(tag)
    unmount_under(base)
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)
    if made_cni_cache:
        with contextlib.suppress(OSError):  # not empty, or in use by another peer
            CNI_CACHE.rmdir()


def reap_stale(parent: Path = Path("/tmp")) -> list[dict[str, object]]:
    """Clear the peers of test sessions that died without clearing them;
    return what their owner.json said (the pykata run root they used among it)."""
    reaped = []
    for base in sorted(parent.glob(f"{PREFIX}*")):
        try:
            owner = json.loads((base / "owner.json").read_text())
            alive = process_alive(int(owner["pid"]), int(owner["start"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not alive:
            clear(base, base.name, str(owner.get("netns", base.name)),
                  bool(owner.get("made_cni_cache")))
            reaped.append(owner)
    return reaped
