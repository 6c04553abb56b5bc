"""Benchmark: what tracing costs `pykata run -- true`, off and on, phase by phase.

Runs, interleaved round by round (so all see the same machine): this tree
with tracing off, this tree with tracing on (exporting to an OTLP/HTTP
receiver in this process), and with `--vs SRC` another checkout's `src`
(for example the commit before tracing, with its own `--vs-cache`, where
its guest assets are built) with its defaults. Prints the median of each
phase side by side; the first round warms caches and is not counted.

    .venv/bin/python -m benchmarks.bench_tracing [--runs 10] [--vs DIR/src --vs-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pykata.config import DEFAULT_CONFIG
from tests.otlp_receiver import OtlpReceiver

HERE_SRC = Path(__file__).resolve().parent.parent / "src"


def one_run(src: Path, cache: str | None, config: Path | None, timings: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "PYKATA_TIMINGS": str(timings)}
    if cache:
        env["PYKATA_CACHE_DIR"] = cache
    if config is not None:
        env["PYKATA_CONFIG"] = str(config)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pykata.cli.main", "run", "--", "true"],
                          env=env, capture_output=True, timeout=600, cwd="/")
    whole = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pykata run failed ({src}): {proc.stderr.decode()[-2000:]}")
    phases: dict[str, float] = json.loads(timings.read_text())
    phases.pop("entered", None)
    phases.pop("exited", None)
    phases["whole"] = whole
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--vs", type=Path, help="another checkout's src directory")
    parser.add_argument("--vs-cache", help="PYKATA_CACHE_DIR for --vs (its guest assets)")
    args = parser.parse_args()
    with OtlpReceiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        text, count = re.subn(r"^enable_tracing = false$", "enable_tracing = true",
                              DEFAULT_CONFIG.read_text(), flags=re.MULTILINE)
        assert count == 1, "the packaged configuration has no enable_tracing line"
        on = Path(tmp) / "tracing-on.toml"
        on.write_text(re.sub(r"^tracing_endpoint = .*$",
                             f'tracing_endpoint = "{receiver.endpoint}"', text,
                             flags=re.MULTILINE))
        variants: dict[str, tuple[Path, str | None, Path | None]] = {
            "tracing off": (HERE_SRC, os.environ.get("PYKATA_CACHE_DIR"), None),
            "tracing on": (HERE_SRC, os.environ.get("PYKATA_CACHE_DIR"), on),
        }
        if args.vs is not None:
            variants["--vs"] = (args.vs, args.vs_cache, None)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_ in range(args.runs + 1):
            for name, (src, cache, config) in variants.items():
                phases = one_run(src, cache, config, Path(tmp) / f"{len(results)}.json")
                if round_:
                    results[name].append(phases)
        traces = len({span.trace_id for span in receiver.spans})
    keys = [k for k in results["tracing off"][0]
            if all(k in run for runs in results.values() for run in runs)]
    print(f"`pykata run -- true`: medians of {args.runs} interleaved runs, seconds")
    print(f"{'phase':28s}" + "".join(f"{name:>14s}" for name in variants))
    for key in keys:
        print(f"{key:28s}" + "".join(
            f"{statistics.median(run[key] for run in results[name]):14.3f}"
            for name in variants))
    print(f"traces received with tracing on: {traces} (one per run, warm-up included)")


if __name__ == "__main__":
    main()
