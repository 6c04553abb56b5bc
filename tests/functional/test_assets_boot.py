"""Boot the built guest kernel with a self-test initrd under QEMU.

The kernel is built in the normal asset cache (several minutes the first time,
then reused by every test and by the runtime). The initrd is a variant of the
real one whose /init, instead of starting the agent, prints the kernel release,
imports what the agent imports with the guest's Python, runs crun, and reboots,
which with `reboot=t` and `-no-reboot` ends QEMU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pykata.assets import AssetCache, InitrdSpec, KernelArtifact, build_initrd, build_kernel
from pykata.assets.initrd_plan import SRC_ROOT
from pykata.assets.kernel import DEFAULT_TARBALL

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU}"),
    pytest.mark.skipif(not DEFAULT_TARBALL.exists(), reason="needs linux-source-6.1"),
]

SELFTEST_INIT = """\
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs run /run
/bin/busybox mount -t tmpfs tmp /tmp
echo "selftest: release $(/bin/busybox uname -r)"
PYTHONPATH=/usr/lib/pykata PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -S -c \
  'import asyncio, json, google.protobuf, pykata.ttrpc; print("python-ok")'
/usr/bin/crun --version
echo "selftest: done"
/bin/busybox reboot -f
"""

STANDIN_MAIN = "import asyncio, json, google.protobuf, pykata.ttrpc\n"


@pytest.fixture(scope="module")
def kernel() -> KernelArtifact:
    """The real guest kernel, from (or built into) the normal cache."""
    return build_kernel(progress=print)


@pytest.fixture(scope="module")
def selftest_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real initrd's contents with the self-test as /init, in a private cache."""
    work = tmp_path_factory.mktemp("selftest")
    init = work / "init"
    init.write_text(SELFTEST_INIT)
    if (SRC_ROOT / "pykata" / "agent" / "__main__.py").exists():
        spec = InitrdSpec(init_script=init)
    else:  # the agent is not written yet: ship a stand-in that imports the same things
        package = work / "standin" / "pykata_standin_agent"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(STANDIN_MAIN)
        spec = InitrdSpec(
            init_script=init,
            entry_module="pykata_standin_agent.__main__",
            source_roots=(work / "standin", SRC_ROOT),
        )
    return build_initrd(spec, AssetCache(work / "cache"), progress=print).image


def boot(kernel_image: Path, initrd: Path, console_log: Path) -> tuple[int, str]:
    """Boot once under TCG; returns QEMU's exit status and the serial console output."""
    argv = [
        QEMU,
        *["-M", "microvm,accel=tcg,acpi=off", "-cpu", "max", "-m", "256"],
        *["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"],
        *["-kernel", str(kernel_image), "-initrd", str(initrd)],
        *["-append", "console=ttyS0 panic=-1 reboot=t"],
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        console_log.write_bytes(out)
        pytest.fail(f"the guest did not finish within {BOOT_TIMEOUT} s; console: {console_log}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console_log.write_bytes(out)
    return proc.returncode, out.decode("utf-8", "replace")


@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
def test_built_assets_boot_and_run_python_and_crun(
    kernel: KernelArtifact, selftest_initrd: Path, image: str, tmp_path: Path
) -> None:
    """Our kernel (either image) boots our initrd; its Python imports what the agent needs."""
    release = kernel.manifest["kernel_release"]
    assert release.endswith("-pykata") and release != os.uname().release
    host_crun = subprocess.run(["crun", "--version"], capture_output=True, text=True, check=True)
    crun_line = host_crun.stdout.splitlines()[0]

    status, console = boot(kernel.path / image, selftest_initrd, tmp_path / "console.log")

    tail = "\n".join(console.splitlines()[-25:])
    assert f"selftest: release {release}" in console, tail
    assert "python-ok" in console, tail
    assert crun_line in console, tail
    assert "selftest: done" in console, tail
    assert "Kernel panic" not in console, tail
    assert status == 0, tail
