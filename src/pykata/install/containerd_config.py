"""containerd's config.toml, with pykata's runtime handler in a marked block.

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

import contextlib
import errno
import glob
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.channels import RUNTIME_TYPE
from pykata.errors import ConfigError, PykataError

HANDLER = "pykata"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
POD_ANNOTATIONS = ("io.katacontainers.*",)
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
BACKUP_SUFFIX = ".pykata-backup"
# systemd's PATH for services that set none (Debian's containerd.service).

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


def table_at(data: dict[str, Any], *keys: str) -> dict[str, Any]:
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
                pending.append((imported, _parse(read_text_file(imported) or "", imported,
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

    runtimes = table_at(data, "plugins", CRI_PLUGIN, "containerd", "runtimes")
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
        imported_data = _parse(read_text_file(imported) or "", imported)
        if CRI_PLUGIN in table_at(imported_data, "plugins"):
            raise ConfigError(
                f"{imported} (imported by {path}) has [plugins.\"{CRI_PLUGIN}\"] settings; "
                f"containerd 1.6 lets them replace {path.name}'s whole CRI section, "
                "pykata's runtime with it",
                hint=f"{imported} is where this node's CRI settings take effect: add "
                     "pykata's tables (deploy/containerd-pykata.toml) to it by hand")

    containerd = table_at(data, "plugins", CRI_PLUGIN, "containerd")
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
    pykata = table_at(result, "plugins", CRI_PLUGIN, "containerd", "runtimes", HANDLER)
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


def os_error(exc: OSError, what: str) -> PykataError:
    hint = None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "run it as root (sudo pykata install ...)"
    return PykataError(f"cannot {what}: {exc.strerror}", hint=hint)


def read_text_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text",
                          hint="containerd reads only UTF-8: fix or move the file") from None
    except OSError as exc:
        raise os_error(exc, f"read {path}") from exc
