"""Shared by the network tests of docker and podman: what must not be left
after each of them, and reading a container's network from its output."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from pykata.runtime.paths import run_root
from tests.functional.conftest import unexpected_leftovers
from tests.oci.docker_peer import settled

# Every address these tests use is in one of these (netns_tools' pod and peer
# link, the bridged docker's bridge); none may be on the machine's interfaces.
TEST_PREFIXES = ("10.231.0.", "10.234.0.")


def machine_test_addresses() -> list[str]:
    """Test addresses on the interfaces of the machine's own network namespace
    (the one this test process runs in)."""
    listing = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                             check=True).stdout
    return [f"address on the machine: {line.strip()}" for line in listing.splitlines()
            if any(f"inet {prefix}" in line for prefix in TEST_PREFIXES)]


def session_monitors() -> list[str]:
    """pykata-oci processes (monitors, or the runtime's own calls) of this
    session: their environment names the session's run root."""
    mine = f"PYKATA_RUN_ROOT={run_root()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")[:2]  # the script, or the interpreter and it
        if any(Path(a.decode(errors="replace")).name == "pykata-oci" for a in argv) \
                and mine in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"monitor {entry.name}: {command[:200]}")
    return found


def vm_leftovers(settle: float = 10.0) -> list[str]:
    """QEMU, monitors, shims, mounts and state of pykata in this session, its
    taps and redirects in test namespaces, test addresses on the machine.
    Asked again for up to `settle` seconds: a monitor exits just after the
    engine saw its container end."""
    return settled(lambda: [*unexpected_leftovers(), *session_monitors(),
                            *machine_test_addresses()], settle)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests_printed(output: str) -> dict[str, str]:
    """`sha256sum FILE...` lines of a container's output, by file."""
    return {m.group(2): m.group(1)
            for m in re.finditer(r"^([0-9a-f]{64})  (\S+)$", output, re.MULTILINE)}


def ipv4_of(output: str, device: str = "eth0") -> str:
    """The IPv4 address `ip -o -4 addr show` printed for device."""
    found = re.search(rf"^\d+: {device}\s+inet (\d+\.\d+\.\d+\.\d+)/", output, re.MULTILINE)
    assert found, f"no IPv4 address of {device} in:\n{output}"
    return found.group(1)
