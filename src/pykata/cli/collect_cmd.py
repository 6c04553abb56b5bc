"""`pykata collect [--output FILE]`: one report for a bug report."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tarfile
import time
from pathlib import Path

from pykata import config as config_mod
from pykata.errors import PykataError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("collect", help="gather a report for a bug report (secrets redacted)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write the report to FILE (mode 0600; a .tar.gz name makes a "
                        "tarball with the text and JSON forms); default stdout")
    p.add_argument("--oci-root", action="append", default=[], metavar="DIR",
                   help="another pykata-oci --root to find containers' monitor logs in")
    p.set_defaults(handler=run)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 (never through a link, never over an existing file:
    a report holds what an attacker would like to read)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise PykataError(f"{path} exists", hint="choose another --output name") from None
    except OSError as exc:
        raise PykataError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def tarball(text: str, as_json: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in (("report.txt", text), ("report.json", as_json)):
            data = body.encode()
            info = tarfile.TarInfo(f"pykata-collect/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    from pykata.collect.report import gather

    cfg = config_mod.load(args.config)
    report = asyncio.run(gather(cfg, [Path(r) for r in args.oci_root]))
    text = report.text()
    if not args.output:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if out.name.endswith((".tar.gz", ".tgz")):
        write_private(out, tarball(text, report.to_json()))
    else:
        write_private(out, text.encode())
    print(f"pykata: report written to {out}", file=sys.stderr)
    return 0
