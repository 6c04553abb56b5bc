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
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from pykata.channels import CONTAINER_TYPE_KEY, SANDBOX_ID_KEY
from pykata.runtime.keys import pod_key
from pykata.shim.flags import ShimFlags

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
    if annotations.get(CONTAINER_TYPE_KEY) in ("container", "sandbox"):
        sandbox = annotations.get(SANDBOX_ID_KEY)
        if isinstance(sandbox, str) and sandbox:
            return sandbox
    return task_id


def sandbox_key(flags: ShimFlags, group: str) -> str:
    """The pod's key: containerd's address, namespace and the pod's id, so two
    containerd instances or namespaces with the same ids never share state."""
    return pod_key(flags.address, flags.namespace, group)


def socket_path(flags: ShimFlags, group: str) -> str:
    return os.path.join(shim_dir(), f"{sandbox_key(flags, group)}.sock")


@contextlib.contextmanager
def pod_lock(socket: str) -> Iterator[None]:
    """Hold the pod's lock file (beside its socket), exclusively.

    The holder may unlink the lock file before releasing it, so that lock
    files do not pile up: whoever then wakes up holding the old, unlinked
    file sees that the path no longer names it, and takes the new one.
    """
    path = socket + ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            held = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
                continue
            yield
            return
        finally:
            os.close(fd)


FileIdentity = tuple[int, int, int]


def file_identity(path: str) -> FileIdentity:
    """What tells one socket file from another at the same path: device,
    inode and modification time. A new file may get a deleted one's inode
    number within the same clock tick, so `_listen` gives each socket a
    random modification time of its own."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def release_pod_files(socket: str, *, only: FileIdentity | None = None,
                      socket_known: bool = True) -> None:
    """With the pod's lock held: remove its socket (only if it is the file
    `only`, when given; not at all unless `socket_known`), and the lock file."""
    with contextlib.suppress(FileNotFoundError):
        if socket_known and (only is None or file_identity(socket) == only):
            os.unlink(socket)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket + ".lock")


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
    os.utime(path, ns=(time.time_ns(), int.from_bytes(os.urandom(7), "big")))
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
    if not os.path.isdir(shim_dir()):
        # The first start after boot may make the run root too: 0700, as every
        # other pykata front end makes it (imported only then: start is hot).
        from pathlib import Path

        from pykata.runtime.paths import private_dir

        private_dir(Path(shim_dir()))
    # Two containers of one pod may start at once; one server per pod.
    with pod_lock(path):
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
