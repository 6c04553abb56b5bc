"""Setting the sysctls of the pod's network namespace, which is the guest's own.

See `guest_spec.take_pod_sysctls` for why the agent sets these instead of crun.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pykata.ttrpc import Code, StatusError

PROC_SYS = Path("/proc/sys")


def sysctl_path(key: str, root: Path = PROC_SYS) -> Path:
    """The /proc/sys file of `key`, as runc finds it (dots are separators).

    A key that would climb out of /proc/sys is refused: it comes from the
    host's spec, which the guest trusts, but a typo must not write elsewhere.
    """
    parts = key.replace(".", "/").split("/")
    if not key or any(part in ("", "..") for part in parts):
        raise StatusError(Code.INVALID_ARGUMENT, f"invalid sysctl name {key!r}")
    return root.joinpath(*parts)


def write_sysctls(values: dict[str, str], root: Path = PROC_SYS) -> None:
    """Write every sysctl of `values`; the first failure is reported by name."""
    for key, value in values.items():
        path = sysctl_path(key, root)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            unknown = exc.errno in (errno.ENOENT, errno.EINVAL)
            code = Code.INVALID_ARGUMENT if unknown else Code.INTERNAL
            raise StatusError(
                code, f"sysctl {key}={value!r} in the pod's network namespace: "
                f"{exc.strerror}") from exc
