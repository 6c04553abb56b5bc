"""`pykata install containerd|runtimeclass`: put pykata on a Kubernetes node.

`install containerd` makes containerd's CRI plugin offer pykata as the runtime
handler `pykata`: it adds pykata's runtime tables to containerd's config.toml
(`pykata.install.containerd_config`: why there, and how), links the shim where
containerd finds it, and makes sure the pykata configuration the handler names
exists. `install runtimeclass` prints (or writes) the RuntimeClass that lets
pods ask for that handler. Every check is made before the first change,
including that no user but root can change what containerd will run as root
(`pykata.install.root_runs`): the installer refuses, also with --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import shutil
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pykata import config as config_mod
from pykata.channels import RUNTIME_TYPE, SHIM_NAME
from pykata.errors import ConfigError, PykataError
from pykata.install import root_runs
from pykata.install.containerd_config import (
    BACKUP_SUFFIX,
    CRI_PLUGIN,
    HANDLER,
    Records,
    edit_config,
    find_block,
    os_error,
    read_text_file,
    remove_block,
    table_at,
    write_atomic,
)

# The PATH systemd gives containerd: a shim linked elsewhere is not found.
SERVICE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def find_shim() -> Path:
    """The installed `containerd-shim-pykata-v2`: beside this Python (a
    virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / SHIM_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(SHIM_NAME)
    if found:
        return Path(os.path.realpath(found))
    raise PykataError(
        f"cannot find {SHIM_NAME} beside {sys.executable} or on PATH",
        hint="install pykata (scripts/setup-venv) and run this installer with that "
             "environment's pykata (.venv/bin/pykata)")


# ---------------------------------------------------------------------------
# Plans: every check first, then the changes

_WOULD = {"wrote": "write", "added": "add", "updated": "update", "linked": "link",
          "removed": "remove", "created": "create"}


@dataclass
class Step:
    """One change: `done` reports it ("wrote X"); `apply` makes it, and may
    return a report of its own instead (when it found nothing to do)."""

    done: str
    apply: Callable[[], str | None]

    @property
    def would(self) -> str:
        verb, _, rest = self.done.partition(" ")
        return f"would {_WOULD[verb]} {rest}"


def _guarded(what: str, action: Callable[[], object]) -> Callable[[], str | None]:
    def apply() -> str | None:
        try:
            action()
        except OSError as exc:
            raise os_error(exc, what) from exc
        return None
    return apply


@dataclass
class Plan:
    """The changes an install or uninstall makes, all found before any is made
    (a refusal leaves everything as it was), and notes on what needs none."""

    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path, data: bytes, done: str, *, mode: int = 0o644) -> None:
        self.steps.append(Step(done, _guarded(f"write {path}",
                                              lambda: write_atomic(path, data, mode=mode))))

    def remove(self, path: Path, done: str) -> None:
        self.steps.append(Step(done, _guarded(f"remove {path}", path.unlink)))

    def link(self, link: Path, target: Path) -> None:
        self.steps.append(Step(f"linked {link} -> {target}",
                               _guarded(f"link {link}", lambda: os.symlink(target, link))))

    def mkdirs(self, directory: Path, made: list[str]) -> None:
        """Steps creating `directory` and its missing parents; `made` gets their names."""
        missing: list[Path] = []
        while not directory.exists() and str(directory) not in made:
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            made.append(str(path))
            self.steps.append(Step(f"created directory {path}", _guarded(
                f"create {path}", functools.partial(path.mkdir, mode=0o755, exist_ok=True))))

    def rmdir(self, path: Path) -> None:
        def apply() -> str | None:
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return f"left directory {path}: not empty"
                raise os_error(exc, f"remove {path}") from exc
            return None
        self.steps.append(Step(f"removed directory {path}", apply))

    def run(self, dry_run: bool) -> None:
        for note in self.notes:
            print(note)
        for step in self.steps:
            print(step.would if dry_run else step.apply() or step.done)
        if not self.steps:
            print("nothing changed")


@dataclass(frozen=True)
class Settings:
    config_dir: Path
    bin_dir: Path
    pykata_config: Path
    pykata_config_given: bool

    @property
    def containerd_config(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def backup(self) -> Path:
        return self.config_dir / f"config.toml{BACKUP_SUFFIX}"

    @property
    def link(self) -> Path:
        return self.bin_dir / SHIM_NAME


def _is_link_to(link: Path | str, target: Path | str) -> bool:
    return os.path.islink(link) and os.readlink(link) == str(target)


def _still_there(records: Records) -> Records:
    """The records of an earlier install that still describe the machine."""
    return Records(
        links=tuple((link, target) for link, target in records.links
                    if _is_link_to(link, target)),
        files=tuple(name for name in records.files if os.path.isfile(name)),
        dirs=tuple(name for name in records.dirs if os.path.isdir(name)),
    )


def plan_install(settings: Settings) -> Plan:
    plan = Plan()
    made_dirs: list[str] = []
    wrote: list[str] = []
    links: list[tuple[str, str]] = []

    # The pykata configuration the handler's ConfigPath names.
    pykata_config = settings.pykata_config
    cfg = config_mod.Config()
    if pykata_config.exists():
        # Checked for who can change it whoever runs this: containerd runs as root.
        root_runs.refuse_untrusted(root_runs.config_items(pykata_config, "", "", ""))
        cfg = config_mod.load(pykata_config)  # refuses a bad file, naming it and the key
        plan.notes.append(f"runtime {HANDLER} uses pykata configuration {pykata_config}")
    elif settings.pykata_config_given:
        raise ConfigError(
            f"pykata configuration {pykata_config} does not exist",
            hint=f"create it (cp {config_mod.DEFAULT_CONFIG} {pykata_config}, then edit "
                 f"it), or leave out --pykata-config to use {config_mod.SYSTEM_CONFIG}")
    else:
        plan.mkdirs(pykata_config.parent, made_dirs)
        wrote.append(str(pykata_config))
        plan.write(pykata_config, config_mod.DEFAULT_CONFIG.read_bytes(),
                   f"wrote {pykata_config} (pykata's default configuration)")

    # The shim, where containerd looks for it; and everything root runs with it.
    shim = find_shim()
    link = settings.link
    root_runs.refuse_untrusted([
        root_runs.Item("the directory of the shim's link", str(settings.bin_dir)),
        *root_runs.shim_items(shim),
        *root_runs.config_items(pykata_config, cfg.qemu.path, cfg.qemu.kernel,
                                cfg.qemu.initrd, cfg.qemu.image),
    ])
    if _is_link_to(link, shim):
        plan.notes.append(f"{link} already links to {shim}")
    elif os.path.lexists(link):
        what = (f"links to {os.readlink(link)}, not to" if os.path.islink(link)
                else "is not a link to")
        raise PykataError(
            f"{link} exists and {what} this pykata's shim {shim}",
            hint=f"if it is an earlier pykata's, remove it (rm {link}) and run this again; "
                 "else choose another --bin-dir")
    else:
        plan.mkdirs(settings.bin_dir, made_dirs)
        plan.link(link, shim)
    links.append((str(link), str(shim)))
    if str(settings.bin_dir) not in SERVICE_PATH:
        plan.notes.append(
            f"note: {settings.bin_dir} is not on the PATH systemd gives containerd "
            f"({':'.join(SERVICE_PATH)}); containerd finds {SHIM_NAME} only on its PATH")

    # containerd's config.toml.
    path = settings.containerd_config
    text = read_text_file(path)
    found = find_block(text, path) if text is not None else None
    if text is None:
        plan.mkdirs(settings.config_dir, made_dirs)
    earlier = _still_there(found.records) if found is not None else Records()
    records = earlier.merged(Records(tuple(links), tuple(wrote), tuple(made_dirs)))
    edit = edit_config(path, text, str(pykata_config), records)
    if not edit.changed:
        plan.notes.append(edit.message)
        return plan
    if edit.backup and text is not None:
        old = read_text_file(settings.backup)
        if old is not None and old != text:
            raise PykataError(
                f"{settings.backup} exists (from an earlier install) and differs from {path}",
                hint=f"move {settings.backup} away, then run this again")
        if old is None:
            plan.write(settings.backup, text.encode(), f"wrote {settings.backup} "
                       f"({path} as it was)", mode=stat.S_IMODE(path.stat().st_mode))
    plan.write(path, (edit.text or "").encode(), edit.message)
    return plan


def plan_uninstall(settings: Settings) -> Plan:
    plan = Plan()
    path = settings.containerd_config
    text = read_text_file(path)
    records = Records()
    removed = remove_block(path, text) if text is not None else None
    if text is None:
        plan.notes.append(f"{path} does not exist: no pykata runtime to remove")
    elif removed is None:
        plan.notes.append(f"{path} has no block of pykata's")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            data = {}
        if HANDLER in table_at(data, "plugins", CRI_PLUGIN, "containerd", "runtimes"):
            plan.notes.append(f"{path} defines runtime {HANDLER} itself (not written by "
                              "pykata install): left as it is")
    else:
        rest, records = removed
        if rest is None:
            plan.remove(path, f"removed {path} (pykata had written it)")
        else:
            plan.write(path, rest.encode(), f"removed pykata's runtime from {path}")
        old = read_text_file(settings.backup)
        if old is not None and old == rest:
            plan.remove(settings.backup, f"removed {settings.backup} ({path} is as it "
                        "was again)")
        elif old is not None:
            plan.notes.append(f"kept {settings.backup}: {path} has changed since pykata was "
                              "installed (compare the two)")
    if not records.links:
        # No record (config.toml replaced since?): a link is ours if it leads to our shim.
        with contextlib.suppress(PykataError):
            shim = find_shim()
            if _is_link_to(settings.link, shim):
                records = records.merged(Records(links=((str(settings.link), str(shim)),)))
    for name, target in records.links:
        if _is_link_to(name, target):
            plan.remove(Path(name), f"removed {name} (linked to {target})")
        elif os.path.lexists(name):
            plan.notes.append(f"left {name}: it no longer links to {target}")
    default = config_mod.DEFAULT_CONFIG.read_bytes()
    for name in records.files:
        if not os.path.isfile(name):
            continue
        if Path(name).read_bytes() == default:
            plan.remove(Path(name), f"removed {name} (pykata's default configuration, "
                        "unchanged)")
        else:
            plan.notes.append(f"left {name}: it has changed since pykata wrote it")
    for name in sorted(records.dirs, key=len, reverse=True):
        if os.path.isdir(name):
            plan.rmdir(Path(name))
    return plan


# ---------------------------------------------------------------------------
# The RuntimeClass

def runtimeclass_manifest(cfg: config_mod.Config) -> str:
    """The RuntimeClass for the `pykata` handler. Its pod overhead is the one
    pykata adds to a pod's host cgroup ([runtime] sandbox_overhead_*), so the
    scheduler, the kubelet's pod cgroup and pykata's sandbox cgroup agree."""
    return (
        "apiVersion: node.k8s.io/v1\n"
        "kind: RuntimeClass\n"
        "metadata:\n"
        f"  name: {HANDLER}\n"
        f"handler: {HANDLER}\n"
        "overhead:\n"
        "  podFixed:\n"
        f"    memory: {cfg.runtime.sandbox_overhead_memory_mib}Mi\n"
        f"    cpu: {cfg.runtime.sandbox_overhead_millicpus}m\n"
    )


# ---------------------------------------------------------------------------
# The command line

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "install", help="set up containerd and Kubernetes to run pods with pykata",
        description="Set up a node's containerd, and print the Kubernetes RuntimeClass, "
                    "for pods with runtimeClassName: pykata (docs/kubernetes.md).")
    verbs = parser.add_subparsers(dest="install_verb", metavar="WHAT")
    verbs.required = True

    ctd = verbs.add_parser(
        "containerd", help="add pykata's runtime to containerd 1.6's CRI plugin",
        description=f"Add the runtime handler {HANDLER!r} (runtime_type {RUNTIME_TYPE}) to "
                    "containerd's config.toml, between marker lines, keeping the rest of the "
                    f"file as it is; link {SHIM_NAME} into the bin directory; write pykata's "
                    "default configuration if the one named is missing. Restart containerd "
                    "afterwards.")
    ctd.add_argument("--config-dir", type=Path, default=Path("/etc/containerd"),
                     metavar="DIR", help="containerd's configuration directory "
                     "(config.toml in it; default /etc/containerd)")
    ctd.add_argument("--bin-dir", type=Path, default=Path("/usr/local/bin"), metavar="DIR",
                     help=f"where to link {SHIM_NAME} (default /usr/local/bin)")
    ctd.add_argument("--pykata-config", metavar="FILE",
                     help="the pykata configuration for the handler's pods (its ConfigPath; "
                          f"default {config_mod.SYSTEM_CONFIG})")
    ctd.add_argument("--dry-run", action="store_true",
                     help="say what would change, change nothing")
    ctd.add_argument("--uninstall", action="store_true",
                     help="remove what an earlier install added, and nothing else")
    ctd.set_defaults(handler=run_containerd)

    rc = verbs.add_parser(
        "runtimeclass", help="print the Kubernetes RuntimeClass for pykata",
        description=f"Print (or write) the RuntimeClass {HANDLER!r}, its pod overhead the "
                    "one the pykata configuration adds to a pod's host cgroup "
                    "([runtime] sandbox_overhead_*). Apply it with "
                    "`pykata install runtimeclass | kubectl apply -f -`.")
    rc.add_argument("--pykata-config", metavar="FILE",
                    help="the pykata configuration to take the VM size from "
                         "(default: the one in effect)")
    rc.add_argument("--manifest", type=Path, metavar="FILE",
                    help="write the manifest to FILE instead of printing it")
    rc.set_defaults(handler=run_runtimeclass)


def _settings(args: argparse.Namespace) -> Settings:
    given = args.pykata_config or args.config
    return Settings(
        config_dir=Path(os.path.abspath(args.config_dir)),
        bin_dir=Path(os.path.abspath(args.bin_dir)),
        pykata_config=Path(os.path.abspath(given)) if given else config_mod.SYSTEM_CONFIG,
        pykata_config_given=bool(given),
    )


def run_containerd(args: argparse.Namespace) -> int:
    settings = _settings(args)
    plan = plan_uninstall(settings) if args.uninstall else plan_install(settings)
    plan.run(args.dry_run)
    if plan.steps and not args.dry_run:
        if args.uninstall:
            print("next: systemctl restart containerd (after moving the node's pykata pods "
                  "away); kubectl delete runtimeclass pykata once no node offers it")
        else:
            print("next: systemctl restart containerd; then, where kubectl reaches the "
                  "cluster: pykata install runtimeclass | kubectl apply -f - "
                  "(or kubectl apply -f deploy/runtimeclass.yaml)")
    return 0


def run_runtimeclass(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pykata_config or args.config)
    manifest = runtimeclass_manifest(cfg)
    if args.manifest is None:
        sys.stdout.write(manifest)
        return 0
    try:
        write_atomic(args.manifest, manifest.encode())
    except OSError as exc:
        raise os_error(exc, f"write {args.manifest}") from exc
    print(f"wrote {args.manifest}")
    return 0
