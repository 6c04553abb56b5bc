"""The test image for docker and podman, made here from busybox-static.

No registry is reachable, so the image is packed from the busybox rootfs that
`pykata run` uses (`ensure_image()`, only read) into the layout `docker save`
writes: docker 20.10's `docker load` reads nothing else, and podman's
`docker-archive:` transport reads the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from pykata.assets.busybox_image import ensure_image

IMAGE = "pykata-test/busybox:latest"
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _walk(root: Path) -> list[Path]:
    """Every path under root, parents before children, symlinks not followed
    (the applets are symlinks to /bin/busybox, absolute, so following them
    would leave the rootfs)."""
    found: list[Path] = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(top)
        found += [base / name for name in sorted(dirs + files)]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def layer_tar(rootfs: Path) -> bytes:
    """The rootfs as one uncompressed layer, owned by root, with fixed mtimes so
    the image ID is the same on every build of the same busybox."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(rootfs):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isdir():
                # a directory's mode is kept (tmp is 1777), nothing else about it
                info.mode = stat.S_IMODE(path.lstat().st_mode)
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out.getvalue()


def image_config(layer_digest: str) -> bytes:
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [ENV_PATH], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "pykata tests: busybox-static rootfs"}],
    }, sort_keys=True).encode()


def write_docker_archive(archive: Path, reference: str = IMAGE,
                         rootfs: Path | None = None) -> Path:
    """A `docker save`-style tarball of the busybox image tagged `reference`:
    manifest.json, the config as <sha256>.json, the layer as <id>/layer.tar
    (plus the legacy `repositories` file and per-layer VERSION/json that older
    loaders look for)."""
    layer = layer_tar(rootfs or ensure_image())
    layer_digest = hashlib.sha256(layer).hexdigest()
    config = image_config(layer_digest)
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    layer_id = layer_digest  # one layer without parent: its diff ID serves as its v1 ID
    repo, _, tag = reference.rpartition(":")
    manifest = json.dumps([{"Config": config_name, "RepoTags": [reference],
                            "Layers": [f"{layer_id}/layer.tar"]}]).encode()
    entries: list[tuple[str, bytes | None]] = [
        (f"{layer_id}/", None),
        (f"{layer_id}/VERSION", b"1.0"),
        (f"{layer_id}/json", json.dumps({"id": layer_id, "created": "1970-01-01T00:00:00Z",
                                         "os": "linux"}).encode()),
        (f"{layer_id}/layer.tar", layer),
        (config_name, config),
        ("manifest.json", manifest),
        ("repositories", json.dumps({repo: {tag: layer_id}}).encode()),
    ]
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                out.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                out.addfile(info, io.BytesIO(data))
    tmp.rename(archive)
    return archive


Cli = Callable[..., subprocess.CompletedProcess[bytes]]


def load_archive(cli: Cli, archive: Path) -> str:
    """`docker load` or `podman load` of the archive (the same verb for both);
    the name the engine gave the image (podman prefixes `localhost/`)."""
    result = cli("load", "-i", str(archive), timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"load of {archive} failed: "
                           f"{result.stderr.decode(errors='replace')}")
    found = re.search(rb"Loaded image(?:\(s\))?: *(\S+)", result.stdout + result.stderr)
    if found is None:
        raise RuntimeError(f"no image name in the load output: {result.stdout!r}")
    return found.group(1).decode()
