"""What every owner of a pod does around it: make it, boot it, serve its
control socket, and end it. The shim, the OCI command line's monitor and
`pykata run` each call `start_pod` once and `OwnedPod.close` once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from pykata import tracing
from pykata.config import Config
from pykata.runtime.control import NO_HOOKS, ControlHooks, control_socket, serve_control
from pykata.runtime.pod import Pod, PodEvent, PodPolicy
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.runtime.vm_source import VmSource
from pykata.ttrpc import Server


@dataclass
class OwnedPod:
    pod: Pod
    server: Server | None = None

    async def close(self) -> None:
        """Stop serving the control socket and end the pod (its containers,
        its VM, its host state). Safe to repeat."""
        if self.server is not None:
            server, self.server = self.server, None
            # A follower of the event log (`pykata events --follow`) gets the
            # last entries (a container's exit) before the socket goes.
            await self.pod.events.settle(1.0)
            await server.aclose()
        try:
            await self.pod.stop()
        finally:
            # The owner goes soon: what the pod's trace holds goes out first.
            tracing.flush()


def new_pod(pod_id: str, config: Config, options: SandboxOptions, *, key: str | None,
            front_end: str, source: VmSource, policy: PodPolicy,
            on_event: Callable[[PodEvent], None] | None = None) -> Pod:
    tracing.configure(config.runtime.enable_tracing, config.runtime.tracing_endpoint,
                      "pykata")
    sandbox = Sandbox(pod_id, config, options, key, front_end=front_end, source=source)
    return Pod(sandbox, policy=policy, on_event=on_event)


async def start_pod(pod: Pod, hooks: ControlHooks = NO_HOOKS) -> OwnedPod:
    """Boot `pod` and serve its control socket; a failed start leaves
    nothing (the pod undoes its own start)."""
    await pod.start()
    owned = OwnedPod(pod)
    try:
        path = control_socket(pod.sandbox.paths.run_dir)
        owned.server = await serve_control(pod, path, hooks)
        pod.sandbox.set_control_socket(path)
    except BaseException:
        with contextlib.suppress(Exception):
            await owned.close()
        raise
    return owned
