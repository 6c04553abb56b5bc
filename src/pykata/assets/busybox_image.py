"""The built-in image of `pykata run`: a root filesystem made from busybox-static.

Made once per busybox binary in the asset cache and only ever used read-only
(containers get an overlay on top), so runs never see each other's writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pykata.errors import HostError

BUSYBOX = Path("/bin/busybox")
_FORMAT = "2"  # bump when the layout below changes
_DIRS = (
    "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run",
    "var/tmp", "home",
)
_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "pykata\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/os-release": 'NAME="pykata busybox"\nID=busybox\n',
}


def _cache_root() -> Path:
    from pykata.assets import default_cache_dir

    return Path(default_cache_dir()) / "images"


def image_key(busybox: Path = BUSYBOX) -> str:
    st = busybox.stat()
    ident = f"{_FORMAT}:{busybox}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def ensure_image(busybox: Path = BUSYBOX, root: Path | None = None) -> Path:
    """The image's rootfs directory, made if missing."""
    if not busybox.is_file():
        raise HostError(
            f"{busybox} not found", hint="install busybox-static (scripts/install-deps)"
        )
    root = root or _cache_root()
    target = root / f"busybox-{image_key(busybox)}" / "rootfs"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _build(busybox, target)
    return target


def _build(busybox: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=target.parent))
    try:
        # mkdtemp makes it 0700: every user of the image must reach its root.
        os.chmod(tmp, 0o755)
        for d in _DIRS:
            (tmp / d).mkdir(parents=True, exist_ok=True)
        os.chmod(tmp / "tmp", 0o1777)
        shutil.copy2(busybox, tmp / "bin" / "busybox")
        for rel, text in _FILES.items():
            (tmp / rel).write_text(text)
        applets = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True
        ).stdout.split()
        for applet in applets:
            link = tmp / applet
            if applet != "bin/busybox" and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        tmp.rename(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def write_oci_archive(archive: Path, reference: str, busybox: Path = BUSYBOX) -> Path:
    """The built-in image as an OCI image-layout tar (for `ctr image import`).

    One uncompressed layer holding the image's rootfs; the index names it
    `reference` (org.opencontainers.image.ref.name), which ctr uses as its name.
    """
    import io
    import json
    import tarfile

    rootfs = ensure_image(busybox)
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{hashlib.sha256(config).hexdigest()}",
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer_digest}", "size": len(layer_bytes)}],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": f"sha256:{hashlib.sha256(manifest).hexdigest()}",
                       "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": reference},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }).encode()
    blobs = [config, manifest, layer_bytes]
    with tarfile.open(archive, "w") as out:
        entries = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)]
        entries += [(f"blobs/sha256/{hashlib.sha256(b).hexdigest()}", b) for b in blobs]
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return archive
