"""The pod monitor: the process that holds a pod's VM for the shim.

`python -m pykata.monitor.pod` boots the sandbox (VM, agent, share) and
serves its control socket (`monitor.sock` in the sandbox's state directory):
every agent call the shim makes passes through it unchanged, and
`pykata.monitor.v1.Monitor/Shutdown` ends the sandbox. It dies with its
parent, the shim (PDEATHSIG), and the VM dies with it, so a killed shim
still takes its pod's VM along, as containerd expects.

It reports on the descriptor named by --ready: one JSON line,
{"ok": true, "qemu_pid": N} or {"error": ..., "hint": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata.channels import AGENT_SERVICE
from pykata.errors import PykataError
from pykata.monitor.service import AGENT_CALLS, MONITOR_SERVICE
from pykata.protocols import monitor_pb2
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.ttrpc import Code, RequestContext, Server, StatusError

log = logging.getLogger(__name__)
_EMPTY = empty_pb2.Empty()

# The shim makes every agent call through its pod's monitor.
POD_FORWARDED = AGENT_CALLS


class PodMonitor:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.shutdown = asyncio.Event()

    def register(self, server: Server) -> None:
        for method, (request_type, response_type) in POD_FORWARDED.items():
            server.register(AGENT_SERVICE, method, request_type,
                            self._forwarder(method, response_type))
        server.register(MONITOR_SERVICE, "State", empty_pb2.Empty, self._state)
        server.register(MONITOR_SERVICE, "Shutdown", empty_pb2.Empty, self._shutdown)

    def _forwarder(self, method: str, response_type: type[Message]) -> Any:
        async def forward(request: Any, ctx: RequestContext) -> Message:
            agent = self.sandbox.agent
            if agent is None:
                raise StatusError(Code.UNAVAILABLE, "the sandbox has no agent")
            return await agent.forward(method, request, response_type, ctx.time_remaining())
        return forward

    async def _state(self, req: empty_pb2.Empty, ctx: RequestContext
                     ) -> monitor_pb2.StateResponse:
        vm = self.sandbox.vm
        running = vm is not None and vm.running
        return monitor_pb2.StateResponse(id=self.sandbox.id,
                                         status="running" if running else "stopped",
                                         pid=(vm.pid or 0) if vm else 0)

    async def _shutdown(self, req: empty_pb2.Empty, ctx: RequestContext) -> empty_pb2.Empty:
        self.shutdown.set()
        return _EMPTY


async def _serve(args: argparse.Namespace, ready_fd: int) -> int:
    from pykata import config as config_mod

    config = config_mod.load(args.config or None)
    options = SandboxOptions(**json.loads(args.options))
    sandbox = Sandbox(args.id, config, options, key=args.key, front_end="shim")
    socket_path = sandbox.paths.run_dir / "monitor.sock"
    sandbox.monitor_socket = str(socket_path)
    monitor = PodMonitor(sandbox)
    server = Server()
    monitor.register(server)
    try:
        try:
            await sandbox.start()
            await server.serve_unix(socket_path)
            os.chmod(socket_path, 0o600)
        except BaseException as exc:
            _report(ready_fd, exc)
            raise
        assert sandbox.vm is not None
        os.write(ready_fd, json.dumps({"ok": True, "qemu_pid": sandbox.vm.pid}).encode()
                 + b"\n")
        os.close(ready_fd)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, monitor.shutdown.set)
        vm_exit = asyncio.ensure_future(sandbox.vm.wait())
        ended = asyncio.ensure_future(monitor.shutdown.wait())
        await asyncio.wait({vm_exit, ended}, return_when=asyncio.FIRST_COMPLETED)
        for task in (vm_exit, ended):
            task.cancel()
        return 0
    finally:
        await server.aclose()
        with contextlib.suppress(OSError):
            socket_path.unlink()
        await sandbox.stop()


def _report(ready_fd: int, exc: BaseException) -> None:
    message = error_message(exc)
    with contextlib.suppress(OSError):
        os.write(ready_fd, json.dumps(message).encode() + b"\n")
        os.close(ready_fd)


def error_message(exc: BaseException) -> dict[str, object]:
    """The report of a failed start, as the shim reads it."""
    message: dict[str, object]
    if isinstance(exc, PykataError):
        message = {"error": exc.message, "hint": exc.hint or "", "kind": type(exc).__name__}
    elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        message = {"error": "interrupted while booting the sandbox", "hint": ""}
    else:
        log.exception("pod monitor failed")
        message = {"error": f"internal error: {exc!r}", "hint": ""}
    return message


async def _serve_warm(args: argparse.Namespace) -> int:
    """A pod monitor kept warm by the VM cache: boot a VM with no pod, report
    it to the cache over the control socket, and wait. The cache either
    closes the socket (it is going away: so does this VM) or hands the VM to
    a shim (an "adopt" message with the shim's pidfd): then this becomes
    that pod's monitor, and ends when the shim does, as one the shim
    started would (PDEATHSIG cannot name a process that is not the parent)."""
    import secrets
    import socket

    from pykata import config as config_mod
    from pykata.factory import cache, wire

    control = socket.socket(fileno=args.control)
    config = config_mod.load(args.config or None)
    key = f"warm-{secrets.token_hex(8)}"
    sandbox = Sandbox(key, config, SandboxOptions(), key=key, front_end="factory")
    monitor = PodMonitor(sandbox)
    server = Server()
    monitor.register(server)
    socket_path = sandbox.paths.run_dir / "monitor.sock"
    # Recorded now; adopt moves it with the sandbox's directory.
    sandbox.monitor_socket = str(socket_path)
    shim_pidfd = -1
    adopted = False
    try:
        try:
            await sandbox.start(create=False)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                wire.send(control, error_message(exc))
            raise
        assert sandbox.vm is not None
        shape = cache.vm_shape(sandbox.vm_config())
        wire.send(control, {"ready": True, "shape": shape, "config": cache.config_digest(config),
                            "qemu_pid": sandbox.vm.pid, "boot": sandbox.boot})
        assignment = asyncio.ensure_future(wire.recv(control))
        vm_exit = asyncio.ensure_future(sandbox.vm.wait())
        await asyncio.wait({assignment, vm_exit}, return_when=asyncio.FIRST_COMPLETED)
        vm_exit.cancel()
        if not assignment.done() or assignment.exception() is not None:
            assignment.cancel()
            return 0  # the cache went away (or the VM died) before a pod took it
        message, fds = assignment.result()
        try:
            request = cache.parse_adoption(message, fds)
            shim_pidfd = request.shim_pidfd
            fds = []
            wanted = cache.vm_shape(Sandbox(request.id, config, request.options,
                                            key=request.key).vm_config())
            if wanted != shape:
                raise PykataError("the cached VM has another shape than the pod asks for")
            await sandbox.adopt(request.id, request.key, request.options)
            socket_path = Path(sandbox.monitor_socket)
            await server.serve_unix(socket_path)
            os.chmod(socket_path, 0o600)
        except BaseException as exc:
            wire.close_fds(fds)
            with contextlib.suppress(OSError):
                wire.send(control, error_message(exc))
            raise
        adopted = True
        wire.send(control, {"ok": True, "qemu_pid": sandbox.vm.pid})
        control.close()
        log.info("sandbox %s: took a VM from the cache (%s)", sandbox.id, sandbox.boot)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, monitor.shutdown.set)
        shim_gone = asyncio.Event()
        loop.add_reader(shim_pidfd, shim_gone.set)
        waits = {asyncio.ensure_future(sandbox.vm.wait()),
                 asyncio.ensure_future(monitor.shutdown.wait()),
                 asyncio.ensure_future(shim_gone.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if shim_gone.is_set():
            log.warning("sandbox %s: its shim is gone: ending the sandbox", sandbox.id)
        return 0
    finally:
        await server.aclose()
        if adopted:
            with contextlib.suppress(OSError):
                socket_path.unlink()
        if shim_pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(shim_pidfd)
            os.close(shim_pidfd)
        with contextlib.suppress(OSError):
            control.close()
        await sandbox.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pykata-pod-monitor")
    p.add_argument("--id")
    p.add_argument("--key")
    p.add_argument("--options", help="SandboxOptions as JSON")
    p.add_argument("--config", default="")
    p.add_argument("--ready", type=int)
    p.add_argument("--warm", action="store_true",
                   help="boot a VM for the VM cache and wait for a pod (see --control)")
    p.add_argument("--control", type=int, help="with --warm: the cache's socket")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    # One line per record on stderr, which the shim relays into its own log.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("asyncio", "qemu"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.warm:
        if args.control is None:
            p.error("--warm needs --control")
        # Not killed with the cache's terminal or session: the cache ends a
        # warm VM by closing its socket, and an adopted one is the pod's.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return asyncio.run(_serve_warm(args))
        except BaseException:
            return 1
    if not (args.id and args.key and args.options and args.ready is not None):
        p.error("--id, --key, --options and --ready are required")
    try:
        return asyncio.run(_serve(args, args.ready))
    except BaseException:
        return 1


if __name__ == "__main__":
    sys.exit(main())
