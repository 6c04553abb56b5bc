"""`pykata install containerd|runtimeclass`: put pykata on a Kubernetes node.

`install containerd` makes containerd's CRI plugin offer pykata as the runtime
handler `pykata`: it adds pykata's runtime tables to containerd's config.toml,
links the shim where containerd finds it, and makes sure the pykata
configuration the handler names exists. `install runtimeclass` prints (or
writes) the RuntimeClass that lets pods ask for that handler.

Why config.toml itself and not a file in an `imports` directory: containerd 1.x
merges an imported file plugin by plugin, so an imported file that mentions
`[plugins."io.containerd.grpc.v1.cri"...]` replaces config.toml's whole CRI
section (containerd issue #5837, changed only in containerd 2.0). On Debian 12
that drops the section's `cni.bin_dir = "/usr/lib/cni"`; and because the
runtimes table is replaced too, CRI's built-in `runc` runtime disappears and
the CRI plugin refuses to load ("no corresponding runtime configured in
`containerd.runtimes` for `containerd` `default_runtime_name`"). The only way to
add a runtime without taking over the node's CRI settings is to add it where
those settings are. So pykata writes a block between two marker lines at the
end of config.toml, leaving every other byte of the file as it was, and adds
a `runc` runtime in that block when the file does not define one (the
built-in one would be lost the same way).

The block also records what the installer created besides it (the shim's
link, the pykata configuration file, directories), so `--uninstall` removes
exactly that and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import os
import shutil
import stat
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata import config as config_mod
from pykata.errors import ConfigError, PykataError
from pykata.shim.cli import RUNTIME_TYPE, SHIM_NAME

HANDLER = "pykata"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
POD_ANNOTATIONS = ("io.katacontainers.*",)
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
BACKUP_SUFFIX = ".pykata-backup"
# systemd's PATH for services that set none (Debian's containerd.service).
SERVICE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

BEGIN = "# BEGIN pykata"
END = "# END pykata"
_BEGIN_LINE = (f"{BEGIN} (written by `pykata install containerd`, removed by its "
               "--uninstall; edit outside these lines)")
_LINK_RECORD = "# pykata linked: "
_FILE_RECORD = "# pykata wrote: "
_DIR_RECORD = "# pykata made directory: "

_TABLE = f'plugins."{CRI_PLUGIN}".containerd.runtimes'


# ---------------------------------------------------------------------------
# The block in config.toml

@dataclass(frozen=True)
class Records:
    """What the installer created besides its block: removed by --uninstall."""

    links: tuple[tuple[str, str], ...] = ()  # (link, target)
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()

    def merged(self, other: Records) -> Records:
        return Records(
            links=tuple(dict.fromkeys(self.links + other.links)),
            files=tuple(dict.fromkeys(self.files + other.files)),
            dirs=tuple(dict.fromkeys(self.dirs + other.dirs)),
        )


@dataclass(frozen=True)
class Block:
    """pykata's block in a config.toml: `text[start:end]` is exactly what the
    installer inserted (with the line break before it), so cutting it out
    gives the file back as it was."""

    start: int
    end: int
    records: Records


def _records(lines: list[str]) -> Records:
    links: list[tuple[str, str]] = []
    files: list[str] = []
    dirs: list[str] = []
    for line in lines:
        if line.startswith(_LINK_RECORD):
            link, sep, target = line.removeprefix(_LINK_RECORD).partition(" -> ")
            if sep:
                links.append((link, target))
        elif line.startswith(_FILE_RECORD):
            files.append(line.removeprefix(_FILE_RECORD))
        elif line.startswith(_DIR_RECORD):
            dirs.append(line.removeprefix(_DIR_RECORD))
    return Records(tuple(links), tuple(files), tuple(dirs))


def find_block(text: str, path: Path) -> Block | None:
    """pykata's block in `text` (the contents of `path`), None when there is none."""
    lines = text.splitlines(keepends=True)
    offset = 0
    begin: int | None = None
    begin_line = 0
    inside: list[str] = []
    for number, line in enumerate(lines, 1):
        bare = line.rstrip("\r\n")
        if begin is None:
            if bare.startswith(BEGIN):
                begin, begin_line = offset, number
        elif bare.startswith(BEGIN):
            raise ConfigError(
                f"{path}: a second '{BEGIN}' marker at line {number} (the first is at "
                f"line {begin_line})",
                hint="keep one block of pykata's, or restore the file from "
                     f"{path.name}{BACKUP_SUFFIX}")
        elif bare.startswith(END):
            start = begin - 1 if begin > 0 else 0
            return Block(start, offset + len(line), _records(inside))
        else:
            inside.append(bare)
        offset += len(line)
    if begin is not None:
        raise ConfigError(
            f"{path}: '{BEGIN}' at line {begin_line} has no '{END}' line after it",
            hint="put the end marker back where pykata's tables end, or restore the file "
                 f"from {path.name}{BACKUP_SUFFIX}")
    return None


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def runtime_tables(pykata_config: str, *, with_runc: bool = False) -> str:
    """containerd 1.6's (config version 2) tables for the `pykata` handler."""
    lines: list[str] = []
    if with_runc:
        lines += [
            "# containerd 1.6 drops its built-in runc runtime once config.toml defines",
            "# any runtime: this keeps it (remove it here if you define runc yourself).",
            f"[{_TABLE}.runc]",
            f"  runtime_type = {_toml_string(RUNC_RUNTIME_TYPE)}",
        ]
    annotations = ", ".join(_toml_string(a) for a in POD_ANNOTATIONS)
    lines += [
        f"[{_TABLE}.{HANDLER}]",
        f"  runtime_type = {_toml_string(RUNTIME_TYPE)}",
        f"  pod_annotations = [{annotations}]",
        "  privileged_without_host_devices = true",
        f"[{_TABLE}.{HANDLER}.options]",
        f"  ConfigPath = {_toml_string(pykata_config)}",
    ]
    return "\n".join(lines) + "\n"


def render_block(pykata_config: str, records: Records, *, with_version: bool,
                 with_runc: bool) -> str:
    lines = [_BEGIN_LINE]
    lines += [f"{_LINK_RECORD}{link} -> {target}" for link, target in records.links]
    lines += [f"{_FILE_RECORD}{path}" for path in records.files]
    lines += [f"{_DIR_RECORD}{path}" for path in records.dirs]
    if with_version:
        lines.append("version = 2")
    body = "\n".join(lines) + "\n" + runtime_tables(pykata_config, with_runc=with_runc)
    return body + END + "\n"


def _table_at(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        value = data.get(key, {})
        data = value if isinstance(value, dict) else {}
    return data


def _parse(text: str, path: Path, what: str = "") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path}{what} is not valid TOML ({exc})",
            hint="fix it (containerd cannot read it either) or move it away, "
                 "then run `pykata install containerd` again") from None


def _check_version(data: dict[str, Any], path: Path) -> None:
    version = data.get("version", 1)
    if version == 2:
        return
    if version == 1:
        raise ConfigError(
            f"{path} is a version 1 containerd configuration (it has no `version = 2`)",
            hint="pykata writes containerd 1.6's version 2 tables: put `version = 2` at "
                 "the top of the file and give its plugin sections their full names "
                 "([plugins.cri] becomes [plugins.\"io.containerd.grpc.v1.cri\"]; "
                 "`containerd config default` shows them), then run this again")
    raise ConfigError(
        f"{path} has `version = {version!r}`, which is not containerd 1.6's",
        hint="this installer writes containerd 1.6's configuration (version 2); on "
             "another containerd add the pykata runtime by hand (docs/kubernetes.md)")


def _imported_files(data: dict[str, Any], path: Path) -> list[Path]:
    """The files `imports` brings in, resolved as containerd 1.6 does (relative
    to the importing file's directory, globs expanded), imports of imports too."""
    found: list[Path] = []
    seen = {path.resolve()}
    pending = [(path, data)]
    while pending:
        source, table = pending.pop(0)
        imports = table.get("imports", [])
        if not isinstance(imports, list):
            raise ConfigError(f"{source}: imports must be a list of paths",
                              hint='write it as imports = ["/etc/containerd/conf.d/*.toml"]')
        for entry in imports:
            if not isinstance(entry, str):
                continue
            pattern = entry if os.path.isabs(entry) else str(source.parent / entry)
            for name in sorted(glob.glob(pattern)):
                imported = Path(name)
                if imported.resolve() in seen or not imported.is_file():
                    continue
                seen.add(imported.resolve())
                found.append(imported)
                pending.append((imported, _parse(_read(imported) or "", imported,
                                                 f" (imported by {source})")))
    return found


@dataclass(frozen=True)
class ConfigEdit:
    """What becomes of config.toml: `text` is its new contents (None: delete
    it), `message` says what changed, or what was found when nothing did."""

    text: str | None
    changed: bool
    message: str
    backup: bool = False


def edit_config(path: Path, text: str | None, pykata_config: str,
                records: Records) -> ConfigEdit:
    """config.toml (`text`, None when missing) with pykata's block as wanted.

    Refuses, naming the file and the fix, what it cannot edit safely: a file
    that is not TOML, not version 2, defines a `pykata` runtime of its own that
    is not pykata's, or imports files with CRI settings (they would replace the
    whole CRI section, pykata's runtime with it)."""
    block = find_block(text, path) if text is not None else None
    if text is not None:
        _parse(text, path)
    if text is None:
        base = ""
    elif block is None:
        base = text
    else:
        base = text[:block.start] + text[block.end:]
    created = text is None or (block is not None and base == "")
    data: dict[str, Any] = {} if created else _parse(base, path)
    if not created:
        _check_version(data, path)

    runtimes = _table_at(data, "plugins", CRI_PLUGIN, "containerd", "runtimes")
    own = runtimes.get(HANDLER)
    if isinstance(own, dict):
        kind = own.get("runtime_type")
        if kind == RUNTIME_TYPE:
            return ConfigEdit(text, False, f"{path} defines runtime {HANDLER} itself "
                              f"(runtime_type {RUNTIME_TYPE}): left as it is")
        raise ConfigError(
            f"{path} already defines a runtime named {HANDLER!r} with runtime_type "
            f"{kind!r}, not {RUNTIME_TYPE!r}",
            hint=f"rename or remove its [{_TABLE}.{HANDLER}] tables, then run this again")

    for imported in _imported_files(data, path):
        imported_data = _parse(_read(imported) or "", imported)
        if CRI_PLUGIN in _table_at(imported_data, "plugins"):
            raise ConfigError(
                f"{imported} (imported by {path}) has [plugins.\"{CRI_PLUGIN}\"] settings; "
                f"containerd 1.6 lets them replace {path.name}'s whole CRI section, "
                "pykata's runtime with it",
                hint=f"{imported} is where this node's CRI settings take effect: add "
                     "pykata's tables (deploy/containerd-pykata.toml) to it by hand")

    containerd = _table_at(data, "plugins", CRI_PLUGIN, "containerd")
    default_runtime = containerd.get("default_runtime_name", "runc")
    with_runc = default_runtime == "runc" and "runc" not in runtimes
    wanted = render_block(pykata_config, records, with_version=created, with_runc=with_runc)
    if block is not None and text is not None:
        lead = "\n" if block.start > 0 else ""
        new = text[:block.start] + lead + wanted + text[block.end:]
    else:
        new = base + ("\n" if base else "") + wanted

    try:
        result = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        reason = f"with them added it would not be valid TOML ({exc})"
        result = {}
    else:
        reason = "its CRI tables are written in a way tables added at the end do not extend"
    pykata = _table_at(result, "plugins", CRI_PLUGIN, "containerd", "runtimes", HANDLER)
    if pykata.get("runtime_type") != RUNTIME_TYPE:
        raise ConfigError(
            f"cannot add pykata's runtime tables to {path}: {reason}",
            hint="its CRI section uses inline tables or dotted keys: add the tables of "
                 "deploy/containerd-pykata.toml to it by hand (docs/kubernetes.md)")
    if new == text:
        return ConfigEdit(text, False, f"{path} already has pykata's runtime")
    if text is None:
        return ConfigEdit(new, True, f"wrote {path} (pykata's runtime)")
    if block is None:
        return ConfigEdit(new, True, f"added pykata's runtime to {path}", backup=True)
    return ConfigEdit(new, True, f"updated pykata's runtime in {path}")


def remove_block(path: Path, text: str) -> tuple[str | None, Records] | None:
    """config.toml without pykata's block (None for the text: pykata wrote the
    whole file, delete it), with the block's records; None without a block."""
    block = find_block(text, path)
    if block is None:
        return None
    rest = text[:block.start] + text[block.end:]
    return (rest if rest else None), block.records


# ---------------------------------------------------------------------------
# Files

def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` by a temporary file renamed over it. An existing file keeps
    its mode and owner (a config.toml may hold registry credentials); a new one
    gets `mode`. A symlink keeps pointing where it did: its target is replaced."""
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st else mode)
        if st is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error(exc: OSError, what: str) -> PykataError:
    hint = None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "run it as root (sudo pykata install ...)"
    return PykataError(f"cannot {what}: {exc.strerror}", hint=hint)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text",
                          hint="containerd reads only UTF-8: fix or move the file") from None
    except OSError as exc:
        raise _os_error(exc, f"read {path}") from exc


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
            raise _os_error(exc, what) from exc
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
                raise _os_error(exc, f"remove {path}") from exc
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
    if pykata_config.exists():
        config_mod.load(pykata_config)  # refuses a bad file, naming it and the key
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

    # The shim, where containerd looks for it.
    shim = find_shim()
    link = settings.link
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
    text = _read(path)
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
        old = _read(settings.backup)
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
    text = _read(path)
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
        if HANDLER in _table_at(data, "plugins", CRI_PLUGIN, "containerd", "runtimes"):
            plan.notes.append(f"{path} defines runtime {HANDLER} itself (not written by "
                              "pykata install): left as it is")
    else:
        rest, records = removed
        if rest is None:
            plan.remove(path, f"removed {path} (pykata had written it)")
        else:
            plan.write(path, rest.encode(), f"removed pykata's runtime from {path}")
        old = _read(settings.backup)
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
    """The RuntimeClass for the `pykata` handler. Its pod overhead is the VM's
    size in the configuration (each pod's VM gets that much, whatever its
    containers ask for)."""
    return (
        "apiVersion: node.k8s.io/v1\n"
        "kind: RuntimeClass\n"
        "metadata:\n"
        f"  name: {HANDLER}\n"
        f"handler: {HANDLER}\n"
        "overhead:\n"
        "  podFixed:\n"
        f"    memory: {cfg.qemu.default_memory}Mi\n"
        f'    cpu: "{cfg.qemu.default_vcpus}"\n'
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
                    "VM size of the pykata configuration. Apply it with "
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
        raise _os_error(exc, f"write {args.manifest}") from exc
    print(f"wrote {args.manifest}")
    return 0
