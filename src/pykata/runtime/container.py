"""A container in a sandbox, as the host sees it: its rootfs share and its agent calls."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pykata.errors import AgentError, PykataError, SpecError
from pykata.host.mounts import Mount, MountError
from pykata.protocols import agent_pb2, oci_pb2
from pykata.protocols.oci_spec import InvalidSpecError, process_from_json, spec_from_json
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.mount_points import MountPoint, make_mount_points
from pykata.runtime.paths import GUEST_SHARED_DIR, SandboxPaths, check_id
from pykata.runtime.resources import ContainerRootfs, ContainerVolume
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.volumes import Volume, plan_volumes

log = logging.getLogger(__name__)


class Container:
    """One container of `sandbox`; its init process has exec id == container id."""

    def __init__(self, sandbox: Sandbox, container_id: str) -> None:
        self.sandbox = sandbox
        self.id = check_id("container id", container_id)
        self.paths: SandboxPaths = sandbox.paths
        self.share = sandbox.share.container(self.id)
        self.rootfs = self.share.rootfs
        self.created = False
        self._rootfs: ContainerRootfs | None = None

    @property
    def agent(self) -> AgentClient:
        if self.sandbox.agent is None:
            raise PykataError(f"sandbox {self.sandbox.id} is not running")
        return self.sandbox.agent

    def share_rootfs(self, mounts: Sequence[Mount], *, readonly: bool = False,
                     mount_points: Sequence[MountPoint] = ()) -> None:
        """Mount the container's rootfs where the guest sees it (the share);
        `readonly` (the spec's root.readonly) holds on the host, all the way
        down, so the `mount_points` it lacks are made in it first."""
        if not mounts:
            raise SpecError(f"container {self.id}: no rootfs to mount")
        if readonly:
            for m in mounts:
                if m.is_bind:
                    make_mount_points(Path(m.source), mount_points)
        self._rootfs = ContainerRootfs(self.share, mounts, readonly=readonly)
        self._rootfs.prepare()

    def scratch(self) -> Path:
        """Host-only space for the container's writable layer (bounded tmpfs)."""
        if not self.share.created:
            self.share.create()
        return self.share.scratch()

    async def create(
        self, spec: dict[str, Any], *, share_pid_ns: bool = False,
        volumes: Sequence[tuple[int, Volume]] | None = None,
    ) -> None:
        """CreateContainer in the guest with `spec` rewritten to guest paths: its
        rootfs, and the host paths it binds in, shared first. `volumes` is
        `plan_volumes` of the spec's mounts when the caller checked them already
        (before a boot, against its bundle). The caller's `delete` undoes a
        failed create."""
        guest = copy.deepcopy(spec)
        ContainerRootfs.attach_path(guest, self.paths.guest_rootfs(self.id))
        try:
            oci = spec_from_json(guest)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid OCI config: {exc}") from exc
        if volumes is None:
            volumes = plan_volumes(guest.get("mounts") or [], None)
        shared = self._share_volumes(oci, volumes)
        try:
            await self.agent.create_container(agent_pb2.CreateContainerRequest(
                container_id=self.id, exec_id=self.id, OCI=oci, sandbox_pidns=share_pid_ns,
            ))
        except AgentError as exc:
            if not shared:
                raise
            # crun names the guest's path of a volume; the user knows the host's.
            message = exc.message
            for guest_path, source in shared.items():
                message = message.replace(guest_path, f"{source} (volume)")
            raise AgentError(message, hint=exc.hint, code=exc.code) from exc
        self.created = True

    def _share_volumes(
        self, oci: oci_pb2.Spec, volumes: Sequence[tuple[int, Volume]]
    ) -> dict[str, Path]:
        """Mount the bind sources under the share and point `oci`'s mounts at
        them as the guest sees them; returns guest path -> host path."""
        shared: dict[str, Path] = {}
        for index, volume in volumes:
            resource = ContainerVolume(self.share, index, volume, GUEST_SHARED_DIR)
            resource.prepare()
            resource.attach(oci.Mounts)
            shared[resource.guest_path] = resource.source
        if shared:
            log.info("container %s: %d host path(s) shared as volumes", self.id, len(shared))
        return shared

    async def start(self) -> None:
        await self.agent.start_container(self.id)

    async def exec(self, exec_id: str, process: dict[str, Any]) -> None:
        check_id("exec id", exec_id)
        try:
            proto = process_from_json(process)
        except InvalidSpecError as exc:
            raise SpecError(f"invalid process spec: {exc}") from exc
        await self.agent.exec_process(self.id, exec_id, proto)

    async def wait(self, exec_id: str = "") -> int:
        return await self.agent.wait_process(self.id, exec_id or self.id)

    async def kill(self, signal: int, *, all_processes: bool = False, exec_id: str = "") -> None:
        target = "" if all_processes else (exec_id or self.id)
        await self.agent.signal_process(self.id, target, signal)

    async def delete(self) -> None:
        """Remove the container in the guest (if the VM still runs) and on the host."""
        if self.created and self.sandbox.vm is not None and self.sandbox.vm.running:
            with contextlib.suppress(PykataError):
                await self.agent.remove_container(self.id)
        self.created = False
        self.unshare_rootfs()

    def unshare_rootfs(self) -> None:
        """Unmount the rootfs and volumes from the share and remove the container's
        directories (only those this container made)."""
        try:
            # Rootfs and volumes go together: they are all under the share.
            self.share.remove()
        except MountError as exc:
            log.error("container %s: %s", self.id, exc)


def bind_rootfs(path: Path) -> list[Mount]:
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise SpecError(f"rootfs {path} {problem}")
    return [Mount("bind", str(path), ("rbind",))]


def spec_readonly_root(spec: dict[str, Any]) -> bool:
    """The spec's root.readonly (Kubernetes readOnlyRootFilesystem)."""
    root = spec.get("root")
    return isinstance(root, dict) and root.get("readonly") is True


def overlay_rootfs(lower: Path, scratch: Path) -> list[Mount]:
    """A writable layer over a read-only image; the writes vanish with the
    container. `scratch` is the container's space on the sandbox's bounded tmpfs."""
    upper, work = scratch / "upper", scratch / "work"
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return [Mount("overlay", "overlay", (
        f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}",
    ))]
