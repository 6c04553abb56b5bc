"""Pods booted from the read-only root image (guest_root = "image", the
default) and from the initrd, on real VMs. The image is mapped into the
guest by default (DAX, guest memory marked persistent): the guest's / is
ext4 mounted ro with dax, reading its files adds nothing to the guest's page
cache, and root in one guest writing it changes neither the host's file nor
another VM's view of it. As a virtio-blk disk
(disable_image_nvdimm = true) the guest caches what it reads and cannot
write the disk by any way it has (remount, clearing the block device's
read-only flag, a direct write). A VM template saved from an image-booted VM
restores with it, both ways; the initrd still boots cold and from a
template."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.assets import AssetPaths
from pykata.runtime.paths import run_root
from tests.functional.conftest import pykata_cli, unexpected_leftovers
from tests.functional.test_debug_console import (
    _config_text,
    _exec,
    _pod_of,
    _start_run,
    _stop_run,
    shared_run_pod,
)


def _root_config(base: Path, root: str = "image", *, templates: bool = False,
                 dax: bool = True) -> Path:
    text = _config_text(console=True, template_root=base / "templates" if templates else None)
    text, count = re.subn(r'(?m)^guest_root = ".*"$', f'guest_root = "{root}"', text)
    assert count == 1, "the packaged configuration has no guest_root line"
    if not dax:
        text, count = re.subn(r"(?m)^disable_image_nvdimm = false$",
                              "disable_image_nvdimm = true", text)
        assert count == 1, "the packaged configuration has no disable_image_nvdimm line"
    conf = base / "pykata.toml"
    conf.write_text(text)
    return conf


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image_pod(guest_assets: AssetPaths, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[str]:
    """A cold `pykata run` pod booted from the image as a DAX device (the
    default), with the debug console."""
    assert guest_assets.image is not None and guest_assets.image.is_file(), (
        "the tests run as root, so `pykata assets build` makes the image")
    conf = _root_config(tmp_path_factory.mktemp("image-pod"))
    with shared_run_pod(conf, "the image pod") as sid:
        yield sid


@pytest.fixture(scope="module")
def disk_pod(guest_assets: AssetPaths, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[str]:
    """A cold pod booted from the image as a read-only virtio-blk disk."""
    conf = _root_config(tmp_path_factory.mktemp("disk-pod"), dax=False)
    with shared_run_pod(conf, "the disk image pod") as sid:
        yield sid


def _root_mount(sid: str) -> tuple[str, list[str]]:
    result = _exec(sid, "sh", "-c", "cat /proc/cmdline; grep ' / ' /proc/mounts; "
                                    "ls /run/pykata-init-stage-2 2>&1; true")
    assert result.returncode == 0, result.err
    root_line = next(line for line in result.out.splitlines() if " / " in line)
    fields = root_line.split()
    assert fields[2] == "ext4" and fields[3].split(",")[0] == "ro", root_line
    # Stage 2's /run hides the small tmpfs stage 1 left its mark on.
    assert "No such file" in result.out
    return result.out, fields[3].split(",")


def test_the_guest_runs_from_the_image_mapped_as_dax(image_pod: str) -> None:
    out, options = _root_mount(image_pod)
    assert "root=/dev/pmem0 ro rootfstype=ext4 rootflags=dax rootwait init=/init" in out
    assert "dax=always" in options or "dax" in options, options


def test_the_disk_image_is_mounted_read_only(disk_pod: str) -> None:
    out, options = _root_mount(disk_pod)
    assert "root=/dev/vda ro rootfstype=ext4 init=/init" in out
    assert not any(o.startswith("dax") for o in options), options


# Reads every file of the image (25 MiB, of which an idle guest has read
# about 19) and prints how much the guest's page cache grew (KiB). It first
# waits for the pod's container to have exec'd its `sleep`: the container
# reads busybox from the shared filesystem into the same page cache.
_CACHE_GROWTH = (
    "for i in $(seq 100); do pgrep -x sleep >/dev/null && break; sleep 0.1; done; "
    "sleep 1; c0=$(awk '/^Cached:/ {print $2}' /proc/meminfo); "
    "find / -xdev -type f -exec cat {} + > /dev/null; "
    "c1=$(awk '/^Cached:/ {print $2}' /proc/meminfo); echo $((c1 - c0))"
)


def test_reading_the_image_copies_nothing_into_the_guest(image_pod: str, disk_pod: str) -> None:
    """The point of DAX: the guest reads the host's pages in place. The same
    reads from the disk fill the guest's own page cache, which shows that the
    measure would catch a copy."""
    grown = {}
    for name, sid in (("dax", image_pod), ("disk", disk_pod)):
        result = _exec(sid, "sh", "-c", _CACHE_GROWTH)
        assert result.returncode == 0, result.err
        grown[name] = int(result.out.split()[-1])
    assert grown["dax"] < 1024, grown
    assert grown["disk"] > 4096, grown


# The image's second block as the guest reads it from its pmem device.
_BLOCK_SUM = "dd if=/dev/pmem0 bs=4096 count=1 skip=1 2>/dev/null | md5sum"


def test_root_in_one_guest_cannot_change_the_dax_image_for_anyone(
        image_pod: str, guest_assets: AssetPaths, tmp_path: Path) -> None:
    """The image is mapped into every DAX guest: root in one guest remounts
    it read-write, writes a file and overwrites a block of /dev/pmem0. QEMU
    mapped the file read-only and made the memory read-only to the guest, so
    the writes are dropped: the host's file keeps its SHA-256, another VM
    mapping the same file reads the same bytes, and the attacking VM keeps
    running (with only its own view of its root spoiled)."""
    assert guest_assets.image is not None
    before = _digest(guest_assets.image)
    neighbour = _exec(image_pod, "sh", "-c", _BLOCK_SUM)
    assert neighbour.returncode == 0, neighbour.err
    proc = _start_run("--config", str(_root_config(tmp_path)))
    sid = ""
    try:
        sid = _pod_of(proc.pid)
        attack = _exec(sid, "sh", "-c",
                       "mount -o remount,rw / && touch /pwned && sync && echo WROTE-FILE; "
                       "dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 seek=1 "
                       "conv=notrunc,fsync 2>/dev/null; echo attacked")
        assert attack.returncode == 0 and "attacked" in attack.out, attack.err
        assert _digest(guest_assets.image) == before
        after = _exec(image_pod, "sh", "-c", _BLOCK_SUM + "; python3 -S -c 'print(6*7)'")
        assert after.returncode == 0, after.err
        assert after.out.splitlines()[0] == neighbour.out.splitlines()[0], after.out
        assert after.out.splitlines()[-1] == "42"
        # The attacker's VM did not die of it: its agent still answers.
        alive = _exec(sid, "true")
        assert alive.returncode == 0, alive.err
    finally:
        _stop_run(proc)
    assert _digest(guest_assets.image) == before
    left = [line for line in unexpected_leftovers() if sid and sid in line]
    assert not left, "the attacking pod left this behind:\n" + "\n".join(left)


def test_root_in_the_guest_cannot_write_the_disk_image(
        disk_pod: str, guest_assets: AssetPaths) -> None:
    assert guest_assets.image is not None
    image = guest_assets.image
    before = _digest(image)
    attack = (
        "mount -o remount,rw / && echo REMOUNTED; "
        "touch /pwned 2>/dev/null && echo WROTE-ROOT; "
        "blockdev --setrw /dev/vda; blockdev --getro /dev/vda; "
        "dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=notrunc,fsync 2>&1 "
        "  && echo WROTE-DISK; "
        "echo 1 > /proc/sys/vm/drop_caches; echo done"
    )
    result = _exec(disk_pod, "sh", "-c", attack)
    assert result.returncode == 0, result.err
    out = result.out
    assert "done" in out, out
    for landed in ("REMOUNTED", "WROTE-ROOT", "WROTE-DISK"):
        assert landed not in out, out
    # The kernel's own flag stays set: the disk says it is read-only.
    assert "\n1\n" in f"\n{out}", out
    assert _digest(image) == before
    mode = image.stat()
    assert mode.st_uid == 0 and not stat.S_IMODE(mode.st_mode) & 0o222
    # After all that the guest still reads its files from the disk.
    again = _exec(disk_pod, "sh", "-c", "python3 -S -c 'print(6*7)'")
    assert again.returncode == 0 and again.out.strip() == "42", again.err


@pytest.mark.parametrize("dax", [True, False], ids=["dax", "disk"])
def test_a_template_saved_from_the_image_restores_with_it(
        guest_assets: AssetPaths, tmp_path: Path, dax: bool) -> None:
    conf = _root_config(tmp_path, templates=True, dax=dax)
    proc = None
    sid = ""
    try:
        built = pykata_cli("--config", str(conf), "run", "--", "echo", "built", timeout=240)
        assert built.returncode == 0 and built.out == "built\n", built.err
        metas = list((tmp_path / "templates").glob("*/template.json"))
        assert len(metas) == 1, metas
        identity = json.loads(metas[0].read_text())["identity"]
        assert identity["initrd"][0] == str(guest_assets.image)
        device = "/dev/pmem0" if dax else "/dev/vda"
        assert f"root={device}" in identity["cmdline"]
        proc = _start_run("--config", str(conf))
        sid = _pod_of(proc.pid)
        state = json.loads((run_root() / "sandboxes" / sid / "state.json").read_text())
        assert state["boot"] == "template"
        result = _exec(sid, "sh", "-c", "grep ' / ' /proc/mounts; touch /x || echo refused; "
                                        + _CACHE_GROWTH)
        assert result.returncode == 0, result.err
        assert " ext4 ro" in result.out and "refused" in result.out, result.out
        # The restored guest still reads the image in place (DAX) or
        # through its own cache (disk): the device came back as it was.
        assert ("dax" in result.out.splitlines()[0]) == dax, result.out
        grown = int(result.out.split()[-1])
        assert grown < 1024 if dax else grown > 4096, result.out
    finally:
        if proc is not None:
            _stop_run(proc)
        pykata_cli("--config", str(conf), "factory", "destroy")
    left = [line for line in unexpected_leftovers() if sid and sid in line]
    assert not left, "the restored pod left this behind:\n" + "\n".join(left)


def test_the_initrd_still_boots_cold_and_from_a_template(tmp_path: Path) -> None:
    """guest_root = "initrd": the root is the unpacked initrd (not ext4), and
    containers start on it (crun's pivot_root needs /init's first stage)."""
    conf = _root_config(tmp_path, "initrd", templates=True)
    try:
        for start in ("cold", "template"):
            result = pykata_cli("--config", str(conf), "run", "--", "sh", "-c",
                                f"echo {start}-ok", timeout=240)
            assert result.returncode == 0, result.err
            assert result.out == f"{start}-ok\n"
        proc = _start_run("--config", str(conf))
        try:
            sid = _pod_of(proc.pid)
            result = _exec(sid, "sh", "-c", "grep ' / ' /proc/mounts; cat /proc/cmdline")
        finally:
            _stop_run(proc)
        assert result.returncode == 0, result.err
        assert " ext4 " not in result.out and "root=" not in result.out, result.out
    finally:
        pykata_cli("--config", str(conf), "factory", "destroy")


def test_a_host_users_lock_on_the_image_stops_no_pod(guest_assets: AssetPaths) -> None:
    """The image is readable by every host user; a lock one of them holds on
    it (QEMU's own lock bytes, 100 to 299) must not keep pods from booting."""
    assert guest_assets.image is not None
    fd = os.open(guest_assets.image, os.O_RDONLY)
    try:
        for offset in range(100, 300):
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, offset)
        result = pykata_cli("run", "--", "echo", "booted", timeout=240)
        assert result.returncode == 0, result.err
        assert result.out == "booted\n"
    finally:
        os.close(fd)
