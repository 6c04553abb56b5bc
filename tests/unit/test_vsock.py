"""The vsock agent channel: dialing with retries, and the VM's command line for it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pykata.host import vsock
from pykata.hypervisor.qemu import QemuVM, VmConfig


async def test_connect_retries_until_the_agent_listens() -> None:
    """Refused connects are retried; the first success is returned."""
    attempts: list[tuple[int, int]] = []
    a, b = socket.socketpair()
    b.close()

    def connect_once(cid: int, port: int) -> socket.socket:
        attempts.append((cid, port))
        if len(attempts) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return a

    sock = await vsock.connect(1234, timeout=5, connect_once=connect_once)
    assert sock is a
    assert attempts == [(1234, vsock.AGENT_PORT)] * 3
    a.close()


async def test_connect_gives_up_at_the_deadline() -> None:
    """An agent that never listens: TimeoutError naming the cid and port."""

    def refuse(cid: int, port: int) -> socket.socket:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(TimeoutError, match="vsock 77:1024"):
        await vsock.connect(77, timeout=0.2, connect_once=refuse)


def test_pick_cid_avoids_reserved_ids() -> None:
    """Context ids 0-2 and the wildcard are never chosen."""
    cids = {vsock.pick_cid() for _ in range(200)}
    assert all(3 <= c < 0xFFFFFFFF for c in cids)
    assert len(cids) > 190


def test_vm_with_vsock_gets_the_device_and_tells_the_agent(tmp_path: Path) -> None:
    """With a cid the VM gets vhost-vsock instead of the agent's serial port, and
    a token port on the socket QEMU inherits; the token itself is nowhere on the
    command line (world-readable on the host), and the guest kernel command
    line tells the agent to listen on vsock."""
    token = bytes(range(32))
    config = VmConfig(name="v", run_dir=tmp_path, qemu_path="/usr/bin/qemu-system-x86_64",
                      kernel=tmp_path / "k", initrd=tmp_path / "i", vsock_cid=4242,
                      vsock_token=token)
    cmd = QemuVM(config).command(qmp_fd=7, agent_fd=9, console_fd=11)
    assert "vhost-vsock-device,id=vsock,guest-cid=4242" in cmd
    assert "virtserialport,bus=tokenserial.0,chardev=token,name=pykata.token" in cmd
    assert "socket,id=token,fd=9" in cmd
    assert not any("agent.channel.0" in arg for arg in cmd)
    text = " ".join(cmd) + config.kernel_cmdline() + repr(config)
    assert token.hex() not in text and repr(token) not in text
    assert "pykata.transport=vsock" in config.kernel_cmdline()
    serial = VmConfig(name="v", run_dir=tmp_path, qemu_path="q", kernel=tmp_path / "k",
                      initrd=tmp_path / "i")
    assert "pykata.transport" not in serial.kernel_cmdline()
