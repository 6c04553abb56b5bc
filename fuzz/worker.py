"""One target in one process: ``python -m fuzz.worker TARGET --workdir DIR ...``.

Started by ``python -m fuzz``; libFuzzer ends this process when it is done.
Order matters here: atheris first, then pykata imported under its
instrumentation, then seeds written and the fds and privileges of the harness
fixed, and only then the first input.
"""

from __future__ import annotations

import argparse
import contextlib
import encodings
import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

import atheris  # type: ignore[import-untyped]

from fuzz import TARGETS
from fuzz._harness import Harness, Target, drop_root


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fuzz.worker")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--timeout", type=int, default=20)
    parser.add_argument("--rss-limit-mb", type=int, default=1024)
    parser.add_argument("--mode", choices=("enforce", "report"), default="enforce")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=Path, nargs="+", default=None,
                        help="run these inputs once each, without libFuzzer, and say what happened")
    return parser.parse_args(argv)


def _replay(harness: Harness, target: Target, paths: list[Path]) -> None:
    one = harness.wrap(target.one_input)
    failed = 0
    for path in paths:
        try:
            one(path.read_bytes())
        except Exception:
            failed += 1
            print(f"{path}: FAILED", flush=True)
            traceback.print_exc()
        else:
            print(f"{path}: ok", flush=True)
    sys.exit(1 if failed else 0)


# Imported before root is dropped: the code under test imports them lazily,
# and nobody may not be able to read the interpreter's library then.
PRELOAD = ("json", "traceback", "linecache", "tokenize", "ctypes.util",
           "google.protobuf.descriptor_pb2")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # json.loads of bytes picks the UTF-8, -16 or -32 codec from the first
    # bytes; bytes.decode may name any codec at all.
    for codec in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"encodings.{codec.name}")


def main(argv: list[str]) -> None:
    args = _arguments(argv)
    with atheris.instrument_imports(include=["pykata"]):
        module = importlib.import_module(f"fuzz.target_{args.target}")
    workdir: Path = args.workdir
    # The harness's own limit fires first, so a hang comes with a traceback.
    harness = Harness(workdir, runs=args.runs, mode=args.mode,
                      hang_seconds=max(1.0, args.timeout * 0.75))
    target: Target = module.make_target(harness)
    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    for index, seed in enumerate(target.seeds()):
        if len(seed) > target.max_len:
            raise ValueError(f"seed {index} is {len(seed)} bytes, above -max_len")
        (corpus / f"seed-{index:03d}").write_bytes(seed)
    preload()
    drop_root([workdir])
    harness.keep_fds_open()
    if args.replay:
        _replay(harness, target, args.replay)
    libfuzzer = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-max_len={target.max_len}",
        f"-artifact_prefix={harness.artifacts}/",
        "-print_final_stats=1",
        *([f"-seed={args.seed}"] if args.seed else []),
        str(corpus),
    ]
    atheris.Setup(libfuzzer, harness.wrap(target.one_input))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
