"""A private dockerd with its default bridge, inside a network namespace the test made.

DockerPeer's daemons, started differently: containerd through `ip netns exec
NETNS`, which gives it a new mount namespace (a slave of the machine's, so
nothing mounted there reaches the machine's) with a /sys of that network
namespace; `ip netns exec` thereby hides the machine's cgroup hierarchies, so
they are mounted again there before containerd starts. dockerd joins that
mount and network namespace (nsenter), so the mounts it makes (the containers'
root filesystems, their network namespaces) are the ones containerd, its runc
shims and the runtime see.

dockerd keeps its default bridge (docker0, BRIDGE_CIDR) in that namespace,
with no iptables rules (no NAT): routing between the bridge and other test
namespaces, and forwarding in this one, are the test's to set up. Published
ports go through docker-proxy (the userland proxy), which listens in that
namespace too. `dns` becomes the containers' default name server, so that
none of them names the machine's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path

from tests.oci.docker_peer import DockerPeer, _mountinfo, mounts_under

BRIDGE_IP = "10.234.0.1"
BRIDGE_CIDR = f"{BRIDGE_IP}/24"
BRIDGE_SUBNET = "10.234.0.0/24"
CGROUP_TOP = "/sys/fs/cgroup"


def cgroup_remount_lines() -> list[str]:
    """Shell commands mounting again what this machine has at /sys/fs/cgroup
    and below (cgroup v1 hierarchies on a tmpfs plus a v2 one, or a single v2
    hierarchy), with the same types and options."""
    lines: list[str] = []
    for fields in _mountinfo():
        point = fields[4]
        if point != CGROUP_TOP and not point.startswith(CGROUP_TOP + "/"):
            continue
        fstype, source, options = fields[fields.index("-") + 1:][:3]
        lines.append(f"mkdir -p {shlex.quote(point)}")
        lines.append(f"mount -t {shlex.quote(fstype)} -o {shlex.quote(options)} "
                     f"{shlex.quote(source)} {shlex.quote(point)}")
        if point == CGROUP_TOP and fstype == "tmpfs":
            # a v1 layout's links (cpu,cpuacct -> cpu), if the machine has them
            top = Path(CGROUP_TOP)
            lines += [f"ln -s {shlex.quote(os.readlink(link))} {shlex.quote(str(link))}"
                      for link in sorted(top.iterdir()) if link.is_symlink()]
    if not lines:
        raise RuntimeError(f"this machine has no cgroup hierarchy at {CGROUP_TOP}")
    return lines


class NetnsDockerPeer(DockerPeer):
    def __init__(self, runtime: Path, netns: str, dns: str, **kwargs: object) -> None:
        super().__init__(runtime, **kwargs)  # type: ignore[arg-type]
        self.netns = netns
        self.dns = dns
        self.mount_ns = 0  # the daemons' mount namespace (inode), once started
        self._inner_baseline: set[str] = set()

    def dockerd_argv(self) -> list[str]:
        argv = super().dockerd_argv()
        at = argv.index("--bridge")
        # Its default bridge, on a private subnet, in the test's namespace;
        # forwarding there is the test's to switch on (--ip-forward=false stays).
        argv = [*argv[:at], "--bip", BRIDGE_CIDR, "--dns", self.dns, *argv[at + 2:]]
        return ["--userland-proxy=true" if a == "--userland-proxy=false" else a for a in argv]

    def daemon_argv(self, argv: list[str]) -> list[str]:
        if self.containerd is None:
            script = "\n".join(["set -e", *cgroup_remount_lines(), 'exec "$@"'])
            return ["ip", "netns", "exec", self.netns, "sh", "-c", script, "sh", *argv]
        ns = f"/proc/{self.containerd.pid}/ns"
        return ["nsenter", f"--mount={ns}/mnt", f"--net={ns}/net", "--", *argv]

    def start(self, timeout: float = 90) -> None:
        super().start(timeout)
        assert self.containerd is not None and self.dockerd is not None
        self.mount_ns = os.stat(f"/proc/{self.containerd.pid}/ns/mnt").st_ino
        if os.stat(f"/proc/{self.dockerd.pid}/ns/mnt").st_ino != self.mount_ns:
            raise RuntimeError("dockerd is not in containerd's mount namespace")
        self._inner_baseline = set(self.inner_mounts())

    def inner_mounts(self, under: Path | None = None) -> list[str]:
        """Mounts under `under` (this peer's directory) in the daemons' mount
        namespace, while they run."""
        if self.containerd is None or self.containerd.poll() is not None:
            return []
        with contextlib.suppress(OSError):
            return mounts_under(under or self.base, str(self.containerd.pid))
        return []

    def in_mount_ns(self) -> list[int]:
        """Processes still in the daemons' mount namespace."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "mnt").st_ino == self.mount_ns:
                        found.append(int(entry.name))
        return found

    def _leftovers(self) -> list[str]:
        found = super()._leftovers()
        found += [f"mount {m} (in the daemons' mount namespace)"
                  for m in self.inner_mounts() if m not in self._inner_baseline]
        if self.mount_ns and (self.dockerd is None or self.dockerd.poll() is not None):
            found += [f"process {pid} in the daemons' mount namespace"
                      for pid in self.in_mount_ns()]
        return found
