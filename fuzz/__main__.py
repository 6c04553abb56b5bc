"""``python -m fuzz [--runs N] [--target NAME ...]``: run the fuzz targets, one
child process each, and print what each did.

Exits 0 only when every target ran all its inputs with no crash, no hang, no
contract violation and within the RSS limit. A failed target's work directory
(libFuzzer's log, the crashing input, notes.json) is kept and named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz import DEFAULT_RUNS, TARGETS

REPO = Path(__file__).resolve().parent.parent
_SHOWN_OBSERVATIONS = 8


@dataclass
class Result:
    target: str
    inputs: int
    seconds: float
    peak_rss_mib: float
    verdict: str
    ok: bool
    workdir: Path
    notes: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    @property
    def exec_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"inputs per target (default {DEFAULT_RUNS})")
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="a target to run (repeatable; default: all)")
    parser.add_argument("--timeout", type=int, default=20,
                        help="seconds one input may take before it counts as a hang "
                             "(libFuzzer's -timeout; the harness reports at 3/4 of it). "
                             "Deadlocks are reported at once whatever this is")
    parser.add_argument("--rss-limit-mb", type=int, default=1024,
                        help="RSS above which libFuzzer stops the target as leaking")
    parser.add_argument("--mode", choices=("enforce", "report"), default="enforce",
                        help="enforce: stop at the first violation; report: keep going, "
                             "save examples of each kind, fail at the end")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's -seed (0: random)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the work directories go (default: the temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep work directories of targets that passed too")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="INPUT",
                        help="run saved inputs (a crash, a violation) through one --target "
                             "once each, without fuzzing, and show what happens")
    return parser.parse_args(argv)


def replay(args: argparse.Namespace) -> int:
    if not args.target or len(args.target) != 1:
        print("--replay needs exactly one --target", file=sys.stderr)
        return 2
    inputs = [path.resolve() for path in args.replay]
    workdir = Path(tempfile.mkdtemp(prefix="pykata-fuzz-replay-"))
    try:
        # The inputs must be readable once the worker is nobody.
        copies = []
        for index, path in enumerate(inputs):
            copy = workdir / f"input-{index}-{path.name}"
            shutil.copyfile(path, copy)
            copies.append(str(copy))
        command = [sys.executable, "-m", "fuzz.worker", args.target[0],
                   "--workdir", str(workdir), "--runs", str(len(inputs)), "--replay", *copies]
        return subprocess.call(command, cwd=REPO)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _stat(log: str, name: str) -> float | None:
    found = re.findall(rf"^stat::{name}:\s+(\d+)", log, re.MULTILINE)
    return float(found[-1]) if found else None


def _failure_excerpt(log: str) -> list[str]:
    lines = log.splitlines()
    for marker in ("=== Uncaught Python exception", "ERROR: libFuzzer", "ALARM:",
                   "==ERROR", "Traceback"):
        for index, line in enumerate(lines):
            if marker in line:
                return lines[index : index + 60]
    return lines[-40:]


def run_target(name: str, args: argparse.Namespace) -> Result:
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"pykata-fuzz-{name}-", dir=base))
    command = [
        sys.executable, "-m", "fuzz.worker", name,
        "--workdir", str(workdir), "--runs", str(args.runs),
        "--timeout", str(args.timeout), "--rss-limit-mb", str(args.rss_limit_mb),
        "--mode", args.mode,
        *(["--seed", str(args.seed)] if args.seed else []),
    ]
    log_path = workdir / "libfuzzer.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)
        # wait4 rather than wait: it gives this child's own peak RSS.
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    notes: dict[str, Any] = {}
    notes_path = workdir / "notes.json"
    if notes_path.exists():
        notes = json.loads(notes_path.read_text())
    inputs = int(notes.get("inputs", 0))
    libfuzzer_runs = _stat(log, "number_of_executed_units")
    peak = max(usage.ru_maxrss / 1024, _stat(log, "peak_rss_mb") or 0.0)

    details: list[str] = []
    violations = notes.get("violations", {})
    # libFuzzer may run an input or two past -runs (it re-runs some new ones).
    if proc.returncode == 0 and not violations and inputs >= args.runs:
        verdict, ok = "no crash, no hang", True
        if libfuzzer_runs is not None and int(libfuzzer_runs) < args.runs:
            verdict, ok = f"libFuzzer ran only {int(libfuzzer_runs)} inputs", False
    else:
        ok = False
        if "ERROR: libFuzzer: timeout" in log or "ALARM: working on the last Unit" in log:
            verdict = "HANG (per-input timeout)"
        elif "out-of-memory" in log:
            verdict = f"RSS LIMIT ({args.rss_limit_mb} MiB) exceeded"
        elif violations:
            total = sum(int(v["count"]) for v in violations.values())
            verdict = (f"VIOLATION: {next(iter(violations))}" if len(violations) == 1
                       else f"VIOLATIONS: {len(violations)} kinds in {total} inputs")
        elif proc.returncode != 0:
            verdict = f"CRASH (exit status {proc.returncode})"
        else:
            verdict = f"only {inputs} of {args.runs} inputs ran"
        if violations and args.mode == "report":
            for kind, entry in violations.items():
                details.append(f"{kind} x{entry['count']}:")
                details += [f"    {line}" for line in str(entry["example"]).splitlines()[:6]]
        else:
            details += _failure_excerpt(log)
        for kind, paths in notes.get("violation_inputs", {}).items():
            details.append(f"inputs for {kind}: {' '.join(paths)}")
        crashes = sorted(str(p) for p in (workdir / "artifacts").glob("*")
                         if not p.name.startswith(("violation-", "observation-")))
        if crashes:
            details.append(f"libFuzzer saved: {' '.join(crashes)}")
    return Result(name, inputs, seconds, peak, verdict, ok, workdir, notes, details)


def _print_notes(result: Result) -> None:
    observations = sorted(result.notes.get("observations", {}).items(),
                          key=lambda item: -int(item[1]["count"]))
    for key, entry in observations[:_SHOWN_OBSERVATIONS]:
        print(f"  {result.target}: logged x{entry['count']}: {key}")
    if len(observations) > _SHOWN_OBSERVATIONS:
        print(f"  {result.target}: ... {len(observations) - _SHOWN_OBSERVATIONS} more "
              f"kinds of log errors in {result.workdir / 'notes.json'}")


def main(argv: list[str]) -> int:
    args = _arguments(argv)
    if args.replay:
        return replay(args)
    targets = args.target or list(TARGETS)
    print(f"pykata fuzz: {args.runs} inputs per target; per-input timeout {args.timeout} s, "
          f"RSS limit {args.rss_limit_mb} MiB, mode {args.mode}", flush=True)
    header = f"{'target':<14}{'inputs':>10}{'seconds':>10}{'exec/s':>9}{'peak RSS':>11}  result"
    print(header, flush=True)
    results = []
    for name in targets:
        result = run_target(name, args)
        results.append(result)
        print(f"{result.target:<14}{result.inputs:>10}{result.seconds:>10.1f}"
              f"{result.exec_per_second:>9.0f}{result.peak_rss_mib:>7.0f} MiB  {result.verdict}",
              flush=True)
    for result in results:
        _print_notes(result)
        if not result.ok:
            print(f"\n--- {result.target}: {result.verdict}; kept {result.workdir}")
            for line in result.details:
                print(f"  {line}")
        elif not args.keep:
            shutil.rmtree(result.workdir, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
