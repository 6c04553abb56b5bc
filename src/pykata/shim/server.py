"""The shim server: one per pod, serving containerd's task API until told to go.

Launched by `start` with the listening socket inherited. It ends on Shutdown
once no task is left, or on SIGTERM/SIGINT; either way it stops the VM and
removes its socket before exiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from pykata import config as config_mod
from pykata.channels import RUNTIME_TYPE
from pykata.shim import shimlog
from pykata.shim.events import EventPublisher
from pykata.shim.flags import ShimFlags
from pykata.shim.service import TASK_REQUESTS, TaskService
from pykata.shim.start import FileIdentity, file_identity, pod_lock, release_pod_files
from pykata.ttrpc import Server

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"


def serve(flags: ShimFlags) -> int:
    if flags.socket_fd < 0:
        print("serve is started by `start`, with -socket-fd", flush=True)
        return 2
    try:
        cfg = config_mod.load()
    except Exception as exc:  # reported through the log FIFO, then exit
        shimlog.setup(flags.bundle_dir(), debug=True, runtime=RUNTIME_TYPE)
        log.error("cannot load the configuration: %s", exc)
        return 1
    shimlog.setup(flags.bundle_dir(), debug=flags.debug or cfg.runtime.enable_debug,
                  runtime=RUNTIME_TYPE)
    try:
        inode: FileIdentity | None = file_identity(flags.socket)
    except OSError:
        inode = None
    try:
        asyncio.run(_serve(flags, cfg, inode))
    except Exception:
        log.exception("shim server failed")
        return 1
    return 0


def _release(path: str, inode: FileIdentity | None) -> None:
    """Stop being found: remove our socket, never a successor's (a new shim
    for a pod with the same id may already serve at the same path)."""
    with pod_lock(path):
        release_pod_files(path, only=inode, socket_known=inode is not None)


async def _serve(flags: ShimFlags, cfg: config_mod.Config,
                 inode: FileIdentity | None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    publisher = EventPublisher(os.environ.get(TTRPC_ADDRESS_ENV, ""), flags.namespace)
    released = False

    def release() -> None:
        # Unfindable before anything else: a `start` from now on launches a
        # new shim rather than hand containerd this one, which is going away.
        nonlocal released
        if not released:
            released = True
            _release(flags.socket, inode)

    def idle() -> None:
        release()
        # Shutdown answers before the server stops: let the reply go out first.
        loop.call_later(0.05, done.set)

    def terminate() -> None:
        release()
        done.set()

    service = TaskService(cfg, publisher, on_idle=idle,
                          pod=(flags.address, flags.namespace))
    server = Server()
    server.register_object(TASK_SERVICE, service, TASK_REQUESTS)
    listener = socket.socket(fileno=flags.socket_fd)
    try:
        await server.serve_socket(listener)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, terminate)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        log.info("shim serving %s for namespace %s", flags.socket, flags.namespace)
        await done.wait()
        log.info("shim shutting down")
    finally:
        release()
        server.stop_listening()
        await service.close()
        await publisher.close()
        await server.aclose()
