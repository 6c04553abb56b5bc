"""Bad input through containerd: `ctr` prints a clear error and nothing is left.

The autouse `no_leftovers` check runs after each test: no QEMU, no shim, no
mount and no /run/pykata state may remain.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd

ConfigWriter = Callable[[str], None]


def test_missing_guest_kernel(containerd: PrivateContainerd, shim_config: ConfigWriter,
                              tmp_path: Path) -> None:
    """A configured kernel that does not exist: ctr names it and the fix."""
    missing = tmp_path / "vmlinux"
    shim_config(f'[hypervisor.qemu]\nkernel = "{missing}"\n')
    result = containerd.run("nokernel", "true")
    assert result.returncode != 0
    assert f"guest kernel not found at {missing}" in result.err
    assert "pykata assets build" in result.err
    assert containerd.ctr("container", "ls", "-q").out.split().count("nokernel") == 0


def test_annotation_not_on_the_allowlist_is_refused(containerd: PrivateContainerd) -> None:
    """A VM annotation the configuration does not enable fails before any VM boots."""
    result = containerd.run(
        "annot", "true",
        extra=("--annotation", "io.katacontainers.config.hypervisor.default_memory=300"),
    )
    assert result.returncode != 0
    assert "io.katacontainers.config.hypervisor.default_memory is not allowed" in result.err
    assert "enable_annotations" in result.err


def test_enabled_annotation_sets_the_vm_memory(containerd: PrivateContainerd,
                                               shim_config: ConfigWriter) -> None:
    """With default_memory on the allowlist the pod's VM gets the memory it asks for."""
    shim_config('[hypervisor.qemu]\nenable_annotations = ["default_memory"]\n')
    result = containerd.run(
        "memory", "grep", "MemTotal", "/proc/meminfo",
        extra=("--annotation", "io.katacontainers.config.hypervisor.default_memory=300"),
    )
    assert result.returncode == 0, result.err
    kib = int(re.search(r"MemTotal:\s+(\d+)", result.out).group(1))  # type: ignore[union-attr]
    assert 200 * 1024 < kib <= 300 * 1024


def test_unsupported_annotation_value(containerd: PrivateContainerd,
                                      shim_config: ConfigWriter) -> None:
    """An enabled annotation with a value out of range is refused with the reason."""
    shim_config('[hypervisor.qemu]\nenable_annotations = ["default_.*"]\n')
    result = containerd.run(
        "badvalue", "true",
        extra=("--annotation", "io.katacontainers.config.hypervisor.default_vcpus=1000"),
    )
    assert result.returncode != 0
    assert "default_vcpus='1000' is invalid: must be between 1 and 64" in result.err


def test_rootfs_that_does_not_exist(containerd: PrivateContainerd, tmp_path: Path) -> None:
    """`ctr run --rootfs` naming a missing directory: refused, named."""
    missing = tmp_path / "no-rootfs"
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--rootfs", str(missing),
                            "norootfs", "true")
    assert result.returncode != 0
    assert f"rootfs {missing} does not exist" in result.err


def test_snapshot_mount_that_fails(containerd: PrivateContainerd) -> None:
    """The overlay mount of a task's snapshot fails (its upper directory is gone):
    ctr shows the mount error; no VM, mount or state remains."""
    cid = "badmount"
    created = containerd.ctr("container", "create", "--runtime", RUNTIME, IMAGE, cid, "true")
    assert created.returncode == 0, created.err
    upper: Path | None = None
    try:
        mounts = containerd.ctr("snapshots", "mounts", "/target", cid).out
        upper = Path(re.search(r"upperdir=([^,\s]+)", mounts).group(1))  # type: ignore[union-attr]
        upper.rename(upper.with_name("fs.away"))
        result = containerd.ctr("task", "start", cid)
        assert result.returncode != 0
        assert "overlay mount" in result.err and "failed" in result.err
        assert "No such file or directory" in result.err
    finally:
        if upper is not None and upper.with_name("fs.away").exists():
            upper.with_name("fs.away").rename(upper)
        containerd.ctr("container", "rm", cid)


def test_bind_mount_source_that_does_not_exist(containerd: PrivateContainerd,
                                               tmp_path: Path) -> None:
    """A bind mount whose host path is missing: ctr names the volume and the path,
    and no VM was booted for it."""
    missing = tmp_path / "nowhere"
    result = containerd.run(
        "novolume", "true",
        extra=("--mount", f"type=bind,src={missing},dst=/data,options=rbind:rw"))
    assert result.returncode != 0
    assert f"volume '/data': host path {missing}: No such file or directory" in result.err
