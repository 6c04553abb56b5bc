"""`pykata factory init|status|destroy`: the VM templates new sandboxes are
restored from ([factory] enable_template) and the VM cache ([factory]
vm_cache_number).

`init` builds the template for the configuration's default VM shape ahead of
the first start (a start that finds no template for its shape builds one
itself), then, with a VM cache configured, serves it in the foreground until
SIGTERM or `destroy`; `status` lists the templates (whether their assets
still match) and the cache's VMs; `destroy` stops the cache and removes the
templates, waiting (--wait) for those being built or restored from: one still
busy then is left in place, and destroy fails saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

from pykata import config as config_mod
from pykata.errors import ConfigError
from pykata.factory import template as templates


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("factory", help="manage the VM templates sandboxes start from")
    verbs = p.add_subparsers(dest="factory_verb", metavar="VERB")
    verbs.required = True
    init = verbs.add_parser("init", help="build the template for the default VM shape")
    init.set_defaults(handler=run_init)
    status = verbs.add_parser("status", help="list the templates")
    status.set_defaults(handler=run_status)
    destroy = verbs.add_parser("destroy", help="remove every template")
    destroy.add_argument(
        "--wait", type=float, default=templates.DESTROY_WAIT_SECONDS, metavar="SECONDS",
        help="how long to wait for templates being built or restored from (default "
             f"{templates.DESTROY_WAIT_SECONDS:g}); those still busy then are left in place")
    destroy.set_defaults(handler=run_destroy)


def run_init(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if not cfg.factory.enable_template and not cfg.factory.vm_cache_number:
        raise ConfigError(f"neither VM templates nor the VM cache are on in {cfg.source}",
                          hint="set enable_template = true or vm_cache_number = N in its "
                               "[factory] section")
    if cfg.factory.enable_template:
        _ensure_template(cfg)
    if cfg.factory.vm_cache_number:
        from pykata.factory.cache import VmCache
        from pykata.factory.sources import vm_source

        print(f"VM cache: keeping {cfg.factory.vm_cache_number} VMs ready", flush=True)
        asyncio.run(VmCache(cfg, cfg.factory.vm_cache_number, vm_source(cfg)).serve())
    return 0


def _ensure_template(cfg: config_mod.Config) -> None:
    from pykata.runtime.sandbox import Sandbox, SandboxOptions

    vm = Sandbox("factory-init", cfg, SandboxOptions()).vm_config()
    reason = templates.unclonable(vm)
    if reason:
        raise ConfigError(f"no template can serve this configuration's VMs: {reason}")
    root = templates.template_root(cfg)
    found, _ = templates.find(root, vm)
    if found is not None:
        print(f"template {found.key} is ready in {found.directory}", flush=True)
        return
    started = time.monotonic()
    made = asyncio.run(templates.build(root, vm, cfg.agent.dial_timeout,
                                       bounds=templates.limits(cfg)))
    print(f"template {made.key} built in {time.monotonic() - started:.1f} s: {made.directory}",
          flush=True)


def run_status(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    root = templates.template_root(cfg)
    state = "on" if cfg.factory.enable_template else "off"
    print(f"VM templates: {state} ({cfg.source}); kept in {root}")
    found = templates.list_templates(root)
    if not found:
        print("no templates")
    for info in found:
        shape = info.shape
        age = time.time() - info.created if info.created else 0.0
        idle = time.time() - info.last_used_ns / 1e9
        print(f"{info.key}  {'stale (assets changed)' if info.stale else 'ready'}  "
              f"{shape['vcpus']} vCPU {shape['memory_mib']} MiB {shape['machine_type']} "
              f"{shape['accel']}  memory file {info.memory_bytes / 2**20:.0f} MiB  "
              f"made {age / 60:.0f} min ago, last used {idle / 60:.0f} min ago")
    if found:
        total = sum(info.size_bytes for info in found)
        print(f"{len(found)} of at most {cfg.factory.template_max_count} templates, "
              f"{total / 2**20:.0f} of at most {cfg.factory.template_max_size} MiB "
              "([factory] template_max_count, template_max_size)")
    if cfg.factory.vm_cache_number:
        from pykata.errors import PykataError
        from pykata.factory import cache

        try:
            answer = asyncio.run(cache.ask(cfg, "status"))
        except PykataError as exc:
            print(f"VM cache: not running ({exc})")
        else:
            print(f"VM cache: {answer.get('ready')} of {answer.get('target')} VMs ready, "
                  f"{answer.get('handed_out')} handed out ({cache.endpoint(cfg)})")
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if cfg.factory.vm_cache_number:
        from pykata.errors import PykataError
        from pykata.factory import cache

        with contextlib.suppress(PykataError, OSError):
            asyncio.run(cache.ask(cfg, "shutdown"))
            print("VM cache: stopping")
    root = templates.template_root(cfg)

    def waiting(keys: list[str]) -> None:
        print(f"waiting up to {args.wait:g} s for {len(keys)} VM template(s) being built "
              f"or restored from: {', '.join(keys)}", flush=True)

    done = templates.destroy(root, max(0.0, args.wait), waiting)
    print(f"removed {len(done.removed)} template(s) from {root}")
    if done.busy:
        print(f"pykata: left {len(done.busy)} VM template(s) in place, still being built or "
              f"restored from after {args.wait:g} s: {', '.join(done.busy)}: run `pykata "
              "factory destroy` again once they are done (or give it a longer --wait)",
              file=sys.stderr)
        return 1
    return 0
