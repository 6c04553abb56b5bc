"""`start`: return the address of the pod's shim server, launching it if needed.

containerd waits for this before every container, so it does the least it can:
read the bundle's annotations, and either find the pod's running server or
bind its socket and launch it. containerd reads everything this prints, to
stdout or stderr, as the address: nothing else may be printed on success.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys

from pykata.shim.cli import ShimFlags

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ADDRESS_FILE = "address"


def shim_dir() -> str:
    return os.path.join(os.environ.get("PYKATA_RUN_ROOT", "/run/pykata"), "shims")


def group_of(bundle: str, task_id: str) -> str:
    """The pod a task belongs to: its CRI sandbox id, or the task itself."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError, AttributeError):
        return task_id
    if annotations.get(CONTAINER_TYPE) in ("container", "sandbox"):
        sandbox = annotations.get(SANDBOX_ID)
        if isinstance(sandbox, str) and sandbox:
            return sandbox
    return task_id


def socket_path(flags: ShimFlags, group: str) -> str:
    # Keyed by containerd's address as well: two containerd instances on one
    # host may use the same namespace and ids.
    digest = hashlib.sha256(f"{flags.address}\0{flags.namespace}\0{group}".encode()).hexdigest()
    return os.path.join(shim_dir(), f"{digest[:32]}.sock")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _launch(flags: ShimFlags, path: str, sock: socket.socket) -> None:
    """The server: a new session, stdio on /dev/null (containerd collects this
    command's output until every copy of it is closed), the socket inherited."""
    fd = sock.fileno()
    os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "pykata.shim", *flags.to_args(),
            "-socket", path, "-socket-fd", str(fd), "serve"]
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, n) for n in (0, 1, 2)]
        os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
    finally:
        os.close(devnull)


def start(flags: ShimFlags) -> int:
    if not flags.id or not flags.namespace:
        print("start needs -id and -namespace", file=sys.stderr)
        return 2
    bundle = flags.bundle_dir()
    path = socket_path(flags, group_of(bundle, flags.id))
    os.makedirs(shim_dir(), mode=0o700, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        # Two containers of one pod may start at once; one server per pod.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _answers(path):
            sock = _listen(path)
            try:
                _launch(flags, path, sock)
            finally:
                sock.close()
    address = f"unix://{path}"
    try:
        with open(os.path.join(bundle, ADDRESS_FILE), "w") as f:
            f.write(address)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
    sys.stdout.write(address)
    return 0
