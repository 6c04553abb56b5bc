"""The agent's start-up and its end: from /init to serving, and powering off."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from pykata.agent import boot_profile, protobuf_backend  # noqa: F401 - first: defers
from pykata.agent.channel import listen_vsock, open_serial, read_token
from pykata.agent.containers import DEFERRED_MODULES, Containers
from pykata.agent.reaper import Reaper
from pykata.agent.service import AgentService, HealthService, build_server
from pykata.agent.warmup import warm_up

log = logging.getLogger("pykata.agent")

BUSYBOX = "/bin/busybox"


def kernel_params(cmdline: str | None = None) -> dict[str, str]:
    """The `pykata.*` parameters of the kernel command line."""
    if cmdline is None:
        try:
            cmdline = Path("/proc/cmdline").read_text()
        except OSError:
            cmdline = ""
    params = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key.startswith("pykata."):
            params[key.removeprefix("pykata.")] = value or "1"
    return params


def setup_logging(debug: bool) -> None:
    # stderr is the guest console, which the host keeps as console.log.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format="pykata-agent: %(levelname)s: %(name)s: %(message)s",
    )


async def serve(params: dict[str, str]) -> None:
    reaper = Reaper()
    reaper.install()
    agent = AgentService(reaper, Containers(reaper))
    server = build_server(agent, HealthService())
    warming = asyncio.ensure_future(warm_up(DEFERRED_MODULES))
    if params.get("transport") == "vsock":
        # Imported here: hmac and hashlib are boot time the serial channel
        # does not need.
        from pykata.agent.listener import AuthenticatedListener

        listener = AuthenticatedListener(server, read_token())
        accepting = asyncio.ensure_future(listener.serve(listen_vsock()))
        boot_profile.mark("agent_listening")
        log.info("serving on vsock port 1024")
        await agent.destroyed.wait()
        accepting.cancel()
    else:
        reader, writer = await open_serial()
        boot_profile.mark("agent_listening")
        log.info("serving on virtio-serial")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("serving at guest uptime %s s", _uptime())
        # The connection ends when the host closes its end: the pykata
        # process that owns this VM is gone, and the VM must go with it.
        await server.serve_connection(reader, writer)
    warming.cancel()
    await server.aclose()
    await agent.containers.remove_all()


def power_off() -> None:
    os.sync()
    # reboot(2); with reboot=t and QEMU's -no-reboot the VM ends.
    os.execv(BUSYBOX, [BUSYBOX, "reboot", "-f"])


def _uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    boot_profile.mark("agent_imported")
    params = kernel_params()
    setup_logging(params.get("debug") == "1")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("agent imported at guest uptime %s s", _uptime())
    try:
        asyncio.run(serve(params))
    except BaseException:
        log.exception("agent failed")
    finally:
        log.info("host channel closed; powering off")
        # Run as PID 1 (an older /init): nobody else would end the VM.
        # Otherwise /init does, once this process is gone.
        if os.getpid() == 1:
            power_off()
