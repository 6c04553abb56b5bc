"""The factory's VM sources (`runtime.vm_source.VmSource`): VMs restored from
a template, and VMs the VM cache keeps warm, each falling back to the next
(cache → template → cold boot) with a log line saying why.

`vm_source(config)` is what every front end hands its pod: the one place
that decides where a pod's VM comes from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from pykata import tracing
from pykata.config import Config
from pykata.errors import AgentError, HypervisorError, PykataError
from pykata.factory import template as templates
from pykata.hypervisor.qemu import QemuVM, VmConfig
from pykata.runtime.vm_source import BootedVm, ColdBoot, VmSource, VmWant, connect_agent

log = logging.getLogger(__name__)


def vm_source(config: Config, *, use_cache: bool = False) -> VmSource:
    """Where a pod's VMs come from under `config`: the VM cache (when
    `use_cache` and the configuration keeps one), else a template (when
    templates are on), else a cold boot."""
    source: VmSource = ColdBoot(config.agent.dial_timeout)
    if config.factory.enable_template:
        source = TemplateSource(config, fallback=source)
    if use_cache and config.factory.vm_cache_number > 0:
        from pykata.factory.cache import CacheSource

        source = CacheSource(config, fallback=source)
    return source


class TemplateSource:
    """Restore VMs from the template of their shape (built on first need);
    boot cold when there is none or the restore fails."""

    def __init__(self, config: Config, fallback: VmSource) -> None:
        self.config = config
        self.fallback = fallback

    async def take(self, want: VmWant) -> BootedVm | None:
        return await self.fallback.take(want)

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        template = await self._template_for(config, name)
        if template is not None:
            try:
                return await self._restore(config, template, name)
            except (HypervisorError, AgentError) as exc:
                log.warning("sandbox %s boots cold: restoring VM template %s failed: %s",
                            name, template.key, exc)
        return await self.fallback.boot(config, name)

    async def _template_for(self, config: VmConfig, name: str) -> templates.Template | None:
        """The template to restore this VM from, built now if its shape has
        none; None (and a log line saying why) for a cold boot."""
        reason = templates.unclonable(config) or templates.shape_refusal(self.config, config)
        if reason:
            log.info("sandbox %s boots cold: %s", name, reason)
            return None
        root = templates.template_root(self.config)
        found, why = templates.find(root, config)
        if found is not None:
            return found
        log.warning("sandbox %s: %s; building one", name, why)
        try:
            return await templates.build(root, config, self.config.agent.dial_timeout,
                                         bounds=templates.limits(self.config))
        except (templates.TemplateBusy, templates.TemplateCapReached) as exc:
            log.warning("sandbox %s boots cold: %s", name, exc)
        except (PykataError, OSError) as exc:
            log.warning("sandbox %s boots cold: building a VM template failed: %s", name, exc)
        return None

    async def _restore(self, config: VmConfig, template: templates.Template,
                       name: str) -> BootedVm:
        """Start the VM from `template`: its memory mapped private, its
        device state loaded, then made its own (clock, randomness)."""
        clone = dataclasses.replace(config, memory_path=template.memory,
                                    memory_shared=False, incoming=True)
        t0 = time.monotonic()
        vm = QemuVM(clone)
        try:
            # Held while QEMU reads the template: eviction leaves it alone.
            async with templates.in_use(template):
                with tracing.span("vm.restore"):
                    await vm.start()
                    await vm.restore_state(template.state)
            t1 = time.monotonic()
            with tracing.span("agent.ready"):
                agent = await connect_agent(vm, clone, self.config.agent.dial_timeout, name,
                                            first_stream_id=template.next_stream_id)
            try:
                # Before any container runs: every clone resumed with the same
                # random pool and a clock stopped at the template's save.
                await agent.set_guest_time(time.time_ns())
                await agent.reseed_random(os.urandom(64))
            except BaseException:
                await agent.close()
                raise
        except BaseException:
            await vm.kill()
            raise
        return BootedVm(vm, agent, clone, "template", t1 - t0, time.monotonic() - t1,
                        vm_name=clone.name)
