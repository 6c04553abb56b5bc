"""`pykata factory init|status|destroy`: the VM templates new sandboxes are
restored from ([factory] enable_template).

`init` builds the template for the configuration's default VM shape ahead of
the first start (a start that finds no template for its shape builds one
itself); `status` lists the templates and whether their assets still match;
`destroy` removes them all.
"""

from __future__ import annotations

import argparse
import asyncio
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
    destroy.set_defaults(handler=run_destroy)


def run_init(args: argparse.Namespace) -> int:
    from pykata.runtime.sandbox import Sandbox, SandboxOptions

    cfg = config_mod.load(args.config)
    if not cfg.factory.enable_template:
        raise ConfigError(f"VM templates are off in {cfg.source}",
                          hint="set enable_template = true in its [factory] section")
    vm = Sandbox("factory-init", cfg, SandboxOptions()).vm_config()
    reason = templates.unclonable(vm)
    if reason:
        raise ConfigError(f"no template can serve this configuration's VMs: {reason}")
    root = templates.template_root(cfg)
    found, _ = templates.find(root, vm)
    if found is not None:
        print(f"template {found.key} is ready in {found.directory}")
        return 0
    started = time.monotonic()
    made = asyncio.run(templates.build(root, vm, cfg.agent.dial_timeout))
    print(f"template {made.key} built in {time.monotonic() - started:.1f} s: {made.directory}")
    return 0


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
        print(f"{info.key}  {'stale (assets changed)' if info.stale else 'ready'}  "
              f"{shape['vcpus']} vCPU {shape['memory_mib']} MiB {shape['machine_type']} "
              f"{shape['accel']}  memory file {info.memory_bytes / 2**20:.0f} MiB  "
              f"made {age / 60:.0f} min ago")
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    root = templates.template_root(cfg)
    removed = templates.destroy(root)
    print(f"removed {len(removed)} template(s) from {root}")
    return 0
