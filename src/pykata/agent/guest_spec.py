"""The OCI spec as the host sent it, made right for the guest.

The host already placed the rootfs and volumes at guest paths. What is left
here is what only the guest knows or what cannot apply inside it: its cgroup
layout, which namespaces the pod's containers share, and host-only settings
(hooks, LSM labels, the host network namespace).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

CGROUP_PARENT = "/pykata"

# Namespaces a container may share with its pod's sandbox container; a path the
# host gave for any other namespace names a host object and is dropped.
_SHAREABLE = {"pid", "ipc", "uts"}
# /proc/<pid>/ns/<name> for each OCI namespace type.
_NS_FILE = {"pid": "pid", "ipc": "ipc", "uts": "uts"}


def for_guest(
    spec: dict[str, Any],
    container_id: str,
    *,
    sandbox_pid: int | None,
    share_pid_ns: bool,
) -> dict[str, Any]:
    """Rewrite `spec` in place for crun in this guest and return it.

    `sandbox_pid` is the init pid of the pod's sandbox container, when this
    container joins a pod that has one; `share_pid_ns` says the pod asked for
    one PID namespace for all its containers.
    """
    linux = spec.setdefault("linux", {})
    linux["cgroupsPath"] = f"{CGROUP_PARENT}/{container_id}"
    linux["namespaces"] = _namespaces(
        linux.get("namespaces", []), sandbox_pid=sandbox_pid, share_pid_ns=share_pid_ns
    )
    if spec.pop("hooks", None):
        log.info("container %s: OCI hooks are for the host and do not run in the guest",
                 container_id)
    linux.pop("mountLabel", None)
    linux.pop("intelRdt", None)
    process = spec.get("process")
    if isinstance(process, dict):
        process.pop("apparmorProfile", None)
        process.pop("selinuxLabel", None)
    return spec


def _namespaces(
    entries: list[dict[str, Any]], *, sandbox_pid: int | None, share_pid_ns: bool
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in entries:
        kind = entry.get("type", "")
        if kind == "network":
            # Containers use the VM's network namespace: the VM is the pod's
            # network boundary, and its interfaces are the pod's.
            continue
        # The host asks for sharing by giving a path (on the host, the sandbox
        # container's namespace); in the guest that is the sandbox's init.
        share = bool(entry.get("path")) and kind in _SHAREABLE and sandbox_pid is not None
        if kind == "pid":
            share = share and share_pid_ns
        if share:
            out.append({"type": kind, "path": f"/proc/{sandbox_pid}/ns/{_NS_FILE[kind]}"})
        else:
            out.append({"type": kind})
    return out
