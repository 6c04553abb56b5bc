"""The sections of `pykata collect`'s report, gathered from this host.

Everything is read, nothing changed: saved states, the pods' owners over
their control sockets (State, Events; a short deadline each, an owner that
does not answer is reported, not waited for), log tails, `--version` of
the tools. Each part is bounded (log tails, event counts), and every text
that came from a guest is escaped (`untrusted.guest_text`). Secrets are
taken out by `redact` as the last step, over the whole text.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pykata import __version__
from pykata import config as config_mod
from pykata.collect import files
from pykata.collect.redact import PUBLIC_ANNOTATIONS, Redactor
from pykata.errors import PykataError
from pykata.runtime.paths import others_can_replace
from pykata.runtime.sandbox_index import SandboxEntry, list_sandboxes
from pykata.runtime.staleness import GuestAssets, current_assets, staleness
from pykata.runtime.state import ContainerState
from pykata.untrusted import guest_text

T = TypeVar("T", dict[str, Any], list[Any])

# Lines of each console and owner log, and entries of each event log.
TAIL_LINES = 40
EVENT_ENTRIES = 40
# The largest OCI spec read (config.json): a bundle is the host's, but big ones exist.
MAX_SPEC = 1 << 20
# Per owner call and per tool's --version.
CALL_SECONDS = 5.0


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)

    def add(self, line: str = "") -> None:
        self.lines.append(line)


@dataclass
class Report:
    sections: list[Section]
    redactor: Redactor

    def text(self) -> str:
        out = []
        for section in self.sections:
            out.append(f"===== {section.title} =====")
            out.extend(section.lines)
            out.append("")
        return self.redactor.text("\n".join(out))

    def to_json(self) -> str:
        # Redacted before encoding: a value with a quote or a backslash
        # would not be found in its JSON-escaped form.
        r = self.redactor.text
        return json.dumps({r(s.title): [r(line) for line in s.lines] for s in self.sections},
                          indent=2)


def _tool_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        return "not found"
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=CALL_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else f"exit status {out.returncode}"


def versions(cfg: config_mod.Config) -> Section:
    from pykata.assets import status

    s = Section("versions")
    s.add(f"pykata: {__version__}")
    s.add(f"python: {platform.python_version()}")
    s.add(f"host kernel: {platform.release()} ({platform.machine()})")
    s.add(f"qemu: {_tool_version([cfg.qemu.path, '--version'])} ({cfg.qemu.path})")
    s.add(f"containerd: {_tool_version(['containerd', '--version'])}")
    s.add(f"ctr: {_tool_version(['ctr', '--version'])}")
    try:
        rows = status()
    except PykataError as exc:
        s.add(f"guest assets: {exc}")
        rows = []
    for row in rows:
        s.add(f"guest {row.kind}: {row.state.value}, key {row.key}, built {row.built_key} at "
              f"{row.built_at}, {row.path}"
              + (f", release {row.kernel_release}" if row.kernel_release else ""))
    crun = _initrd_crun()
    s.add(f"crun (copied into the initrd and the root image): {crun}")
    s.add(f"guest root: {cfg.qemu.guest_root}")
    if cfg.qemu.kernel or cfg.qemu.initrd or cfg.qemu.image:
        s.add(f"configured assets: kernel {cfg.qemu.kernel or '(cache)'}, "
              f"initrd {cfg.qemu.initrd or '(cache)'}, image {cfg.qemu.image or '(cache)'}")
    return s


def _initrd_crun() -> str:
    """The crun the current initrd was built with, by its build manifest."""
    try:
        from pykata.assets import locate

        manifest = json.loads((locate().initrd.parent / "manifest.json").read_text())
        crun = str(manifest.get("inputs", {}).get("crun", ""))
    except (PykataError, OSError, ValueError, AttributeError):
        return "unknown (no current initrd)"
    return f"{_tool_version([crun, '--version'])} ({crun})" if crun else "unknown"


def check_section(cfg: config_mod.Config) -> Section:
    from pykata.cli.check_cmd import gather

    s = Section("pykata check")
    try:
        for item in gather(cfg):
            mark = "FAIL" if not item.ok else "WARN" if item.warn else "ok  "
            s.add(f"{mark} {item.name}  {item.value}  ({item.detail})")
    except PykataError as exc:
        s.add(f"check failed: {exc}")
    return s


def env_section(cfg: config_mod.Config) -> Section:
    from pykata.cli.env_cmd import to_toml

    s = Section("pykata env")
    s.add(f"# configuration in effect: {cfg.source}")
    s.lines.extend(to_toml(cfg.to_dict()).rstrip().splitlines())
    return s


@dataclass
class PodFacts:
    """What the report says of one sandbox."""

    entry: SandboxEntry
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


async def _ask_owner(entry: SandboxEntry, facts: PodFacts, redactor: Redactor) -> bool:
    """State and the event log from a live pod's owner; False if it did not
    answer."""
    from pykata.runtime.control_client import PodClient

    assert entry.state is not None
    try:
        async with await PodClient.connect(entry.state.control_socket,
                                           f"pod {entry.id}") as client:
            state = await asyncio.wait_for(client.state(), CALL_SECONDS)
            reply = await asyncio.wait_for(client.events(), CALL_SECONDS)
    except (PykataError, TimeoutError) as exc:
        facts.lines.append(f"  owner: did not answer ({exc})")
        return False
    facts.lines.append(f"  status: {state.status}")
    for c in state.containers:
        facts.lines.append(f"  container {c.id}: {c.status}, init exit {c.init.exit_status}, "
                           f"{len(c.execs)} exec(s), bundle {c.bundle or '-'}")
        facts.lines.extend(f"    {line}" for line in _spec_lines(c.bundle, redactor))
    entries = list(reply.entries)
    facts.events = [f"{e.seq} {e.kind}{' ERROR' if e.error else ''} {e.text}"
                    for e in entries[-EVENT_ENTRIES:]]
    facts.errors = [f"pod {entry.id}: {e.text}" for e in entries if e.error]
    return True


def _spec_lines(bundle: str, redactor: Redactor) -> list[str]:
    """The container's command, env names and annotation keys (values
    redacted, and learned so they are taken out everywhere else)."""
    if not bundle:
        return []
    path = Path(bundle) / "config.json"
    try:
        # Any owner: a rootless engine's bundle is its user's.
        spec = json.loads(files.read_file(path, MAX_SPEC, owners=None))
    except files.Skipped as exc:
        return [f"spec: {guest_text(str(exc), 512)}"]
    except ValueError as exc:
        return [f"spec: {path}: {exc}"]
    if not isinstance(spec, dict):
        return [f"spec: {path} is not an object"]
    redactor.learn_spec(spec)
    process = _of(spec.get("process"), dict)
    args = _of(process.get("args"), list)
    env = _of(process.get("env"), list)
    annotations = _of(spec.get("annotations"), dict)
    return [f"command: {str(args[0]) if args else '-'} (+{max(0, len(args) - 1)} argument(s) "
            "not shown)",
            f"env: {' '.join(redactor.env(env)) or '-'}",
            f"annotations: {json.dumps(redactor.annotations(annotations))}"]


def _of(value: Any, kind: type[T]) -> T:
    """`value` if it is a `kind`, else an empty one (a spec's field of the wrong type)."""
    return value if isinstance(value, kind) else kind()


def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """A log's last lines, escaped; a file that is not a plain one of root's
    (or of whoever runs collect) is not read, and the line says why."""
    try:
        data = files.read_tail(path, 65536, files.trusted_owners()).decode("utf-8", "replace")
    except files.Skipped as exc:
        return [f"({guest_text(str(exc))})"]
    return guest_text("\n".join(data.rstrip().splitlines()[-lines:]), 65536).splitlines()


def _oci_logs(key: str, oci_roots: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The monitor logs of pykata-oci containers whose sandbox is `key`, and
    why any root or record was passed over."""
    records, notes = _oci_records(key, oci_roots)
    return [d / "monitor.log" for d, _ in records], notes


def _oci_records(key: str, oci_roots: Sequence[Path]
                 ) -> tuple[list[tuple[Path, ContainerState]], list[str]]:
    """The saved records of pykata-oci containers whose sandbox is `key`
    (with their directories), and why any root or record was passed over. A
    root another user could write in is not searched: its records and logs
    would be theirs to forge."""
    from pykata.runtime.state import from_dict

    found: list[tuple[Path, ContainerState]] = []
    notes: list[str] = []
    for root in oci_roots:
        try:
            dirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
        except OSError:
            continue
        problem = others_can_replace(root)
        if problem:
            notes.append(f"--oci-root {root} not searched: {problem}")
            continue
        for d in dirs:
            path = d / "state.json"
            try:
                raw = files.read_file(path, MAX_SPEC, files.trusted_owners())
                record = from_dict(json.loads(raw), ContainerState, where=str(path))
            except files.Skipped as exc:
                notes.append(str(exc))
                continue
            except (PykataError, ValueError):
                continue
            if record.sandbox_key == key:
                found.append((d, record))
    return found, [guest_text(note, 512) for note in notes]


def _saved_specs(key: str, oci_roots: Sequence[Path], redactor: Redactor) -> list[str]:
    """When the owner is gone or does not answer, what the saved records
    still say of its containers: their specs are read (and their secrets
    learned) from the bundles the records name."""
    records, _ = _oci_records(key, oci_roots)
    lines = []
    for _, record in records:
        redactor.learn(str(v) for k, v in record.annotations.items()
                       if not str(k).startswith(PUBLIC_ANNOTATIONS))
        lines.append(f"  container {record.id} (its saved record): {record.status}, "
                     f"bundle {record.bundle or '-'}")
        lines.extend(f"    {line}" for line in _spec_lines(record.bundle, redactor))
    return lines


async def pod_facts(entry: SandboxEntry, current: GuestAssets | None,
                    redactor: Redactor, oci_roots: Sequence[Path] = ()) -> PodFacts:
    facts = PodFacts(entry)
    state = entry.state
    if state is None:
        facts.lines.append(f"  unreadable state: {entry.error}")
        return facts
    verdict = staleness(state, current=current)
    facts.lines += [
        f"  key: {state.key}, front end: {state.front_end}, "
        f"owner pid {state.owner_pid} ({'running' if entry.alive else 'gone'}), "
        f"VM pid {state.qemu_pid}, boot {state.boot or '-'}",
        f"  created: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(state.created))}",
        f"  guest assets: {verdict.state.value} ({verdict.detail})",
        f"  kernel {state.guest_kernel or '-'}, initrd {state.guest_initrd or '-'}",
    ]
    if entry.alive and state.control_socket and await _ask_owner(entry, facts, redactor):
        return facts
    facts.lines += [f"  container {cid}: {procs.get('', '?')}"
                    for cid, procs in state.containers.items()]
    if state.front_end == "oci":
        facts.lines += _saved_specs(state.key, oci_roots, redactor)
    return facts


def pod_sections(facts: PodFacts, oci_roots: Sequence[Path]) -> list[Section]:
    state = facts.entry.state
    head = Section(f"pod {facts.entry.id}", list(facts.lines))
    sections = [head]
    if facts.events:
        sections.append(Section(f"pod {facts.entry.id}: event log (last {EVENT_ENTRIES})",
                                facts.events))
    if state is None:
        return sections
    console = Path(state.console_log)
    sections.append(Section(f"pod {facts.entry.id}: console ({console}, last {TAIL_LINES} "
                            "lines)", _tail(console) or ["(empty)"]))
    logs, notes = _oci_logs(state.key, oci_roots) if state.front_end == "oci" else ([], [])
    head.lines += [f"  owner logs: {note}" for note in notes]
    for log in logs:
        sections.append(Section(f"pod {facts.entry.id}: owner log ({log}, last {TAIL_LINES} "
                                "lines)", _tail(log) or ["(empty)"]))
    if not logs:
        where = {"shim": "the shim writes its log into containerd's log (the `log` FIFO): "
                         "see containerd's own output, e.g. `journalctl -u containerd`",
                 "run": "`pykata run` logs to its own stderr",
                 "oci": "no monitor.log found (pass the container manager's --root with "
                        "--oci-root)"}.get(state.front_end, "unknown")
        head.add(f"  owner log: {where}")
    return sections


def error_lines(sections: Sequence[Section]) -> list[str]:
    """Lines of the logs gathered that report an error."""
    found = []
    for section in sections:
        if "owner log" in section.title or "console" in section.title:
            found += [f"{section.title.split(':')[0]}: {line}" for line in section.lines
                      if "level=error" in line or "ERROR" in line or "Kernel panic" in line]
    return found


async def gather(cfg: config_mod.Config, oci_roots: Sequence[Path] = ()) -> Report:
    from pykata.oci.store import default_root

    redactor = Redactor()
    roots = [default_root(), *oci_roots]
    head = Section("pykata collect")
    head.add(f"collected: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} on "
             f"{platform.node()}, uid {os.geteuid()}")
    head.add("values of environment variables and annotations are replaced by <redacted>")
    sections = [head, versions(cfg), check_section(cfg), env_section(cfg)]
    entries = list_sandboxes()
    overview = Section("pods")
    try:
        current = current_assets(cfg)
    except PykataError:
        current = None
    for entry in entries:
        if entry.state is None:
            overview.add(f"{entry.id}: unreadable state")
            continue
        stale = staleness(entry.state, current=current).state.value
        overview.add(f"{entry.id}: {entry.state.front_end}, "
                     f"{'running' if entry.alive else 'owner gone'}, {entry.state.boot or '-'}"
                     f" boot, assets {stale}, {len(entry.state.containers)} container(s)")
    if not entries:
        overview.add("(none)")
    sections.append(overview)
    facts = await asyncio.gather(*(pod_facts(e, current, redactor, roots) for e in entries))
    redactor.keep({e.id for e in entries} | {e.paths.key for e in entries}
                  | {c for e in entries if e.state for c in e.state.containers})
    pod_parts = [s for f in facts for s in pod_sections(f, roots)]
    sections += pod_parts
    errors = Section("recent errors")
    errors.lines = [line for f in facts for line in f.errors] + error_lines(pod_parts)
    if not errors.lines:
        errors.add("(none)")
    sections.append(errors)
    return Report(sections, redactor)
