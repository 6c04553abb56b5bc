"""Benchmark: a one-command debug console session (`pykata exec ID -- true`)
beside the command line's own start-up (`pykata --version`), against one
`pykata run` pod with the console enabled. The rounds alternate the commands,
so both see the same machine; medians are printed side by side.

    .venv/bin/python -m benchmarks.bench_debug_console [--runs 15]   (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pykata import config

PYKATA = [sys.executable, "-m", "pykata.cli.main"]


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=env)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")
    return seconds


def _pod_id(root: Path, owner: int, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in root.glob("sandboxes/*/state.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("owner_pid") == owner and state.get("control_socket"):
                return str(state["id"])
        time.sleep(0.2)
    raise SystemExit("the benchmark's pod did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pykata-bench-console-") as tmp:
        base = Path(tmp)
        conf = base / "pykata.toml"
        conf.write_text(config.DEFAULT_CONFIG.read_text().replace(
            "debug_console_enabled = false", "debug_console_enabled = true"))
        env = {**os.environ, "PYKATA_RUN_ROOT": str(base / "run")}
        pod = subprocess.Popen([*PYKATA, "--config", str(conf), "run", "--", "sh", "-c",
                                "trap 'exit 0' TERM; sleep 3600 & wait"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
        try:
            sid = _pod_id(base / "run", pod.pid)
            commands = {
                "pykata --version (the CLI's start-up)": [*PYKATA, "--version"],
                "pykata exec ID -- true": [*PYKATA, "exec", sid, "--", "true"],
                "pykata exec ID -- cat /proc/loadavg": [*PYKATA, "exec", sid, "--", "cat",
                                                        "/proc/loadavg"],
            }
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, argv in commands.items():
                    samples[name].append(_timed(argv, env))
        finally:
            pod.send_signal(signal.SIGTERM)
            pod.wait(timeout=120)
    print(f"{'command':42s} {'median':>9s} {'min':>7s} {'max':>7s}  (runs={args.runs}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, values in samples.items():
        print(f"{name:42s} {statistics.median(values) * 1000:7.0f}ms "
              f"{min(values) * 1000:5.0f}ms {max(values) * 1000:5.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
