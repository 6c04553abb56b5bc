"""Pod-to-pod traffic through CRI and CNI: pykata pods beside runc pods.

A private containerd with its CRI plugin runs in a network namespace of the
benchmark's own (tests/cri/cri_peer.py: CNI bridge, host-local addresses);
for each handler it starts a server pod (`iperf3 -s`) and a client pod (an
iperf3 container and a busybox one) on that bridge, and measures from the
client pod:

- TCP throughput: `iperf3 -c SERVER -t SECONDS`, the receiver's rate;
- round-trip time: busybox `ping` of the server pod, the average of its pings.

iperf3 is Debian's, packed into an image here with the libraries it links
(the busybox test image has no iperf3). Each figure is the median of
--runs; the handlers alternate within a run. Called by
`benchmarks.bench_network --cri`.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from pykata import config
from pykata.protocols import cri_pb2 as cri
from tests.cri.client import CriClient
from tests.cri.conftest import container_config, pod_config
from tests.cri.cri_peer import CriPeer, write_image_archive

IPERF_IMAGE = "docker.io/pykata/iperf3:bench"
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
SECONDS = 3
PINGS = 20


def iperf_image(out: Path) -> Path:
    """An image of Debian's iperf3 and the libraries `ldd` names."""
    binary = shutil.which("iperf3")
    if binary is None:
        raise SystemExit("iperf3 is missing: apt-get install iperf3")
    # /tmp: iperf3's buffer files (its TMPDIR default); the layer holds files
    # only, so a placeholder makes the directory.
    files = {"/usr/bin/iperf3": (Path(binary).read_bytes(), 0o755), "/tmp/.keep": (b"", 0o644)}
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            files[path] = (Path(path).resolve().read_bytes(), 0o755)
    return write_image_archive(out / "iperf3-oci.tar", IPERF_IMAGE, files,
                               ["/usr/bin/iperf3", "-s"])

def _iperf_config(name: str, argv: list[str]) -> cri.ContainerConfig:
    # iperf3 keeps each stream's buffer in a file under /tmp that it unlinks
    # while open: the rootfs must be virtio-fs (9p fails that file's use).
    made = container_config(name, argv)
    made.image.image = IPERF_IMAGE
    return made


class PodPair:
    def __init__(self, client: CriClient, peer: CriPeer, handler: str) -> None:
        self.client = client
        self.handler = handler
        self.pods: list[str] = []
        started = time.monotonic()
        server_config = pod_config(peer, f"bench-{handler}-server")
        server = client.run_pod_sandbox(server_config, handler)
        self.pods.append(server)
        container = client.create_container(
            server, _iperf_config("iperf3", ["/usr/bin/iperf3", "-s"]), server_config)
        client.start_container(container)
        self.server_ip = client.pod_sandbox_status(server).status.network.ip
        client_config = pod_config(peer, f"bench-{handler}-client")
        pod = client.run_pod_sandbox(client_config, handler)
        self.pods.append(pod)
        self.iperf = client.create_container(
            pod, _iperf_config("iperf3", ["/usr/bin/iperf3", "-s"]), client_config)
        client.start_container(self.iperf)
        self.shell = client.create_container(pod, container_config("sh", IDLE), client_config)
        client.start_container(self.shell)
        print(f"  {handler}: two pods up in {time.monotonic() - started:.2f} s")
        time.sleep(1)  # the servers listen

    def throughput(self) -> float:
        """The receiver's MiB/s over SECONDS of iperf3."""
        result = self.client.exec_sync(
            self.iperf, ["/usr/bin/iperf3", "-c", self.server_ip, "-t", str(SECONDS), "-J"],
            timeout=120)
        try:
            report = json.loads(result.stdout)
            bits = report["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"{self.handler}: iperf3 failed ({exc}): "
                             f"{result.stdout.decode()[-400:]} {result.stderr.decode()}") from exc
        return float(bits) / 8 / 1024 / 1024

    def rtt(self) -> float:
        """Average ping round trip in ms."""
        result = self.client.exec_sync(
            self.shell, ["ping", "-c", str(PINGS), "-i", "0.2", self.server_ip], timeout=120)
        match = re.search(r"= [\d.]+/([\d.]+)/", result.stdout.decode())
        if result.exit_code != 0 or not match:
            raise SystemExit(f"{self.handler}: ping failed: {result.stdout.decode()}")
        return float(match.group(1))

    def remove(self) -> None:
        for pod in self.pods:
            self.client.stop_pod_sandbox(pod)
            self.client.remove_pod_sandbox(pod)


def pykata_config_text(shared_fs: str) -> str:
    """The packaged configuration, with `shared_fs` when one is given."""
    text = config.DEFAULT_CONFIG.read_text()
    if not shared_fs:
        return text
    text, count = re.subn(r'^shared_fs = ".*"$', f'shared_fs = "{shared_fs}"', text,
                          flags=re.MULTILINE)
    if count != 1:
        raise SystemExit("the packaged configuration has no shared_fs line")
    return text


def bench_traffic(runs: int, shared_fs: str = "") -> None:
    peer = CriPeer(pykata_config_text(shared_fs))
    try:
        peer.start()
        peer.import_images()
        peer.import_image(iperf_image(peer.base))
        with CriClient(peer.socket) as client:
            client.wait_ready()
            pairs = [PodPair(client, peer, handler) for handler in ("runc", "pykata")]
            rates: dict[str, list[float]] = {p.handler: [] for p in pairs}
            rtts: dict[str, list[float]] = {p.handler: [] for p in pairs}
            try:
                for _ in range(runs):
                    for pair in pairs:
                        rates[pair.handler].append(pair.throughput())
                        rtts[pair.handler].append(pair.rtt())
            finally:
                for pair in pairs:
                    pair.remove()
    finally:
        peer.stop()
    rate = {h: statistics.median(v) for h, v in rates.items()}
    rtt = {h: statistics.median(v) for h, v in rtts.items()}
    print(f"pod to pod through the CNI bridge, median of {runs} (alternated):")
    print(f"  TCP throughput (iperf3, {SECONDS} s)  runc {rate['runc']:8.1f} MiB/s   "
          f"pykata {rate['pykata']:7.1f} MiB/s   runc/pykata {rate['runc'] / rate['pykata']:.1f}x")
    print(f"  round trip (ping, avg of {PINGS})   runc {rtt['runc']:8.3f} ms      "
          f"pykata {rtt['pykata']:7.3f} ms      pykata/runc {rtt['pykata'] / rtt['runc']:.1f}x")
