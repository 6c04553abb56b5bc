"""What QEMU may do on the host: the capabilities and system calls it keeps.

QEMU runs as root because its 9p server must read every file of a container's
rootfs and keep the ownership the guest gives files (security_model=
passthrough). The guest drives that server as root, so whatever QEMU may do to
a file, a hostile guest may do. Root alone would let it make setuid-root
programs, device nodes and file capabilities in a volume, for any host user to
run. So QEMU starts with:

- only CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER in its
  bounding set (no CAP_MKNOD: no device nodes; no CAP_FSETID: a write clears
  setuid/setgid bits; no CAP_SETFCAP: no file capabilities; no CAP_SYS_ADMIN:
  no trusted.* xattrs, no mounts), no inheritable or ambient capabilities, and
  no_new_privs;
- a seccomp filter, in the spirit of systemd's RestrictSUIDSGID=, that fails
  with EPERM every chmod, file creation, mkdir or mknod whose mode carries
  S_ISUID or S_ISGID, and openat2 (whose mode the filter cannot read) with
  ENOSYS so callers use openat;
- PR_SET_PDEATHSIG, checked against a parent that died before it took effect.

QEMU's own -sandbox filter comes on top of this one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

# Capabilities QEMU keeps (linux/capability.h numbers).
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 0, 1, 2, 3
KEPT_CAPABILITIES = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER)

# Classic BPF, as seccomp runs it (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGE_K = 0x35
_JMP_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_OFFSET_NR, _OFFSET_ARCH = 0, 4
EPERM, ENOSYS = 1, 38

SETID_BITS = stat.S_ISUID | stat.S_ISGID

# x86_64 system calls that take a file mode, and the argument that holds it.
MODE_SYSCALLS: dict[str, tuple[int, int]] = {
    "open": (2, 2), "creat": (85, 1), "openat": (257, 3),
    "mkdir": (83, 1), "mkdirat": (258, 2),
    "mknod": (133, 1), "mknodat": (259, 2),
    "chmod": (90, 1), "fchmod": (91, 1), "fchmodat": (268, 2), "fchmodat2": (452, 2),
}
NR_OPENAT2 = 437


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int = 0
    jt: str | None = None  # label to jump to when true (None: the next instruction)
    jf: str | None = None
    label: str | None = None


def _assemble(program: list[_Insn]) -> list[tuple[int, int, int, int]]:
    """Resolve labels into the relative jump offsets classic BPF wants."""
    where = {insn.label: i for i, insn in enumerate(program) if insn.label}

    def offset(i: int, label: str | None) -> int:
        if label is None:
            return 0
        delta = where[label] - i - 1
        if not 0 <= delta < 256:
            raise ValueError(f"jump to {label} out of range")
        return delta

    out = []
    for i, insn in enumerate(program):
        k = insn.k
        if insn.code == _JMP_JA:
            k, jt, jf = offset(i, insn.jt), 0, 0
        else:
            jt, jf = offset(i, insn.jt), offset(i, insn.jf)
        out.append((insn.code, jt, jf, k))
    return out


def setid_filter() -> list[tuple[int, int, int, int]]:
    """The seccomp program: (code, jt, jf, k) rows."""
    arg_label = {1: "arg1", 2: "arg2", 3: "arg3"}
    program = [
        _Insn(_LD_W_ABS, _OFFSET_ARCH),
        _Insn(_JMP_JEQ_K, AUDIT_ARCH_X86_64, jf="deny"),
        _Insn(_LD_W_ABS, _OFFSET_NR),
        # x32 system calls have numbers of their own: none is QEMU's.
        _Insn(_JMP_JGE_K, _X32_SYSCALL_BIT, jt="deny"),
        _Insn(_JMP_JEQ_K, NR_OPENAT2, jt="enosys"),
    ]
    for nr, arg in MODE_SYSCALLS.values():
        program.append(_Insn(_JMP_JEQ_K, nr, jt=arg_label[arg]))
    program.append(_Insn(_RET_K, RET_ALLOW))
    for arg in (1, 2, 3):
        # seccomp_data: args[i] at 16 + 8 * i, the low 32 bits first (x86_64).
        program.append(_Insn(_LD_W_ABS, 16 + 8 * arg, label=arg_label[arg]))
        if arg != 3:
            program.append(_Insn(_JMP_JA, jt="check"))
    program += [
        _Insn(_JMP_JSET_K, SETID_BITS, jt="deny", label="check"),
        _Insn(_RET_K, RET_ALLOW),
        _Insn(_RET_K, RET_ERRNO | EPERM, label="deny"),
        _Insn(_RET_K, RET_ERRNO | ENOSYS, label="enosys"),
    ]
    return _assemble(program)


def _last_capability() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_V3 = 0x20080522


def confining_hook(parent_pid: int, *, die_with_parent: bool = True,
                   capabilities: tuple[int, ...] = KEPT_CAPABILITIES,
                   name: bytes = b"QEMU") -> Callable[[], None]:
    """A pre-exec hook for QEMU (and, with its own `capabilities`, for
    virtiofsd: `hypervisor.virtiofsd`). Everything is prepared here, before fork:
    the forked child only makes system calls (importing or allocating there
    could deadlock on a lock another thread held at fork time).

    `die_with_parent`: QEMU gets SIGKILL when `parent_pid` dies, so a killed
    owner takes its VM along. Off only for a VM the VM cache keeps warm: a
    pod's owner takes it over, and it must outlive the cache (the guest
    powers off when the cache's end of its agent channel closes, see
    `factory.cache`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl, capget, capset = libc.prctl, libc.capget, libc.capset
    for fn in (prctl, capget, capset):
        fn.restype = ctypes.c_int
    rows = setid_filter()
    filters = (_SockFilter * len(rows))(*(_SockFilter(c, jt, jf, k) for c, jt, jf, k in rows))
    prog = _SockFprog(len(rows), filters)
    dropped = [c for c in range(_last_capability() + 1) if c not in capabilities]
    kept_mask = sum(1 << c for c in capabilities if c < 32)
    kept_high = sum(1 << (c - 32) for c in capabilities if c >= 32)
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    ulong = ctypes.c_ulong

    def fail(step: bytes) -> None:
        os.write(2, b"pykata: confining " + name + b" failed at " + step + b"\n")
        os._exit(126)

    def hook() -> None:
        if die_with_parent:
            prctl(PR_SET_PDEATHSIG, ulong(signal.SIGKILL), ulong(0), ulong(0), ulong(0))
        if os.getppid() != parent_pid:
            # The owner died before the death signal was armed: nobody would
            # ever stop this VM.
            os._exit(1)
        if prctl(PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
            fail(b"no_new_privs")
        for cap in dropped:
            if prctl(PR_CAPBSET_DROP, ulong(cap), ulong(0), ulong(0), ulong(0)) != 0:
                fail(b"capability bounding set")
        prctl(PR_CAP_AMBIENT, ulong(PR_CAP_AMBIENT_CLEAR_ALL), ulong(0), ulong(0), ulong(0))
        if capget(ctypes.byref(header), data) != 0:
            fail(b"capget")
        # Now, not only at exec: nothing between here and QEMU keeps more.
        data[0].effective = data[0].permitted = kept_mask
        data[1].effective = data[1].permitted = kept_high
        data[0].inheritable = data[1].inheritable = 0
        if capset(ctypes.byref(header), data) != 0:
            fail(b"capset")
        if prctl(PR_SET_SECCOMP, ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog),
                 ulong(0), ulong(0)) != 0:
            fail(b"seccomp")

    return hook
