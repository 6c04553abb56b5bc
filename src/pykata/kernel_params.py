"""Which guest kernel parameters a pod may add (its `kernel_params` annotation).

A pod's words are appended to the guest's kernel command line, and the kernel
does more with them than set its own knobs: a word it does not know goes to
/init, as an environment variable when it reads NAME=VALUE and as an argument
otherwise; `sysctl.*` writes any sysctl (`sysctl.kernel.panic=0` leaves a
panicked guest spinning); `--` hands all that follows to /init. So a pod gets
an allowlist: the parameter names below, which this guest kernel takes for
itself and which change nothing but the pod's own VM, plus what the operator
adds in `[hypervisor.qemu] valid_kernel_params`. Some names stay refused
whatever the configuration says (`never_reason`).

Names compare as the kernel compares them: `-` and `_` are the same.
"""

from __future__ import annotations

import re
import string

# Each of these is taken by pykata's guest kernel itself (none is in its
# "Unknown kernel command line parameters ... passed to user space" line), and
# each changes only how the pod's own guest behaves.
POD_KERNEL_PARAMS: dict[str, str] = {
    # How much the guest kernel prints. The console log on the host is capped
    # (console_log_size) and root in the guest can print as much anyway.
    "quiet": "fewer kernel messages",
    "loglevel": "the console's message level",
    "debug": "kernel debug messages",
    "ignore_loglevel": "every kernel message on the console",
    "printk.time": "timestamps on kernel messages",
    "printk.devkmsg": "whether /dev/kmsg takes writes from user space",
    "initcall_debug": "a message per kernel initialisation call (boot timing)",
    # CPU vulnerability mitigations inside the guest: they protect the guest's
    # own processes from each other; the host and other VMs keep the host
    # kernel's. (spectre_v2, spec_store_bypass_disable, pti and tsx are left
    # out: this kernel also hands them to /init.)
    "mitigations": "every CPU vulnerability mitigation at once",
    "nospectre_v1": "Spectre v1 mitigation",
    "spectre_v2_user": "Spectre v2 user-space mitigation",
    "spectre_bhi": "branch history injection mitigation",
    "l1tf": "L1TF mitigation",
    "mds": "MDS mitigation",
    "tsx_async_abort": "TAA mitigation",
    "mmio_stale_data": "MMIO stale data mitigation",
    "retbleed": "Retbleed mitigation",
    "srbds": "SRBDS mitigation",
    "gather_data_sampling": "GDS mitigation",
    "reg_file_data_sampling": "RFDS mitigation",
    "spec_rstack_overflow": "SRSO mitigation",
    # Which cgroup controllers the guest offers its containers. (Huge pages
    # and transparent_hugepage are not in this kernel: it hands those to /init.)
    "cgroup_disable": "turns a cgroup controller off",
    "cgroup_no_v1": "keeps controllers off cgroup v1",
    "cgroup.memory": "memory controller options (nosocket, nokmem)",
}

# Never a pod's, whatever the configuration lists: what starts the guest's init
# and agent, what keeps a panic or reboot the VM's end, where the console goes.
NEVER_KERNEL_PARAMS: dict[str, str] = {
    "init": "it chooses the guest's init (pykata's agent)",
    "rdinit": "it chooses the guest's init (pykata's agent)",
    "root": "the guest runs from pykata's initrd or root image",
    "rootfstype": "the guest runs from pykata's initrd or root image",
    "rootflags": "the guest runs from pykata's initrd or root image",
    "rw": "pykata's root image stays read-only",
    "rootwait": "the guest runs from pykata's initrd or root image",
    "memmap": "pykata lays out the guest's memory (the root image's place in it)",
    "mem": "pykata lays out the guest's memory (the root image's place in it)",
    "noinitrd": "the guest runs from pykata's initrd or root image",
    "initrd": "the guest runs from pykata's initrd or root image",
    "panic": "pykata ends the VM on a guest panic (panic=-1)",
    "reboot": "pykata ends the VM on a guest reboot",
    "console": "pykata reads the guest console on ttyS0",
    "earlycon": "pykata reads the guest console on ttyS0",
    "earlyprintk": "pykata reads the guest console on ttyS0",
    "--": "it hands what follows to the guest's init",
}
_NEVER_PREFIXES = {
    "pykata.": "it is pykata's own",
    "sysctl.": "it writes a guest sysctl (kernel.panic, say); set sysctls for every "
               "pod in [hypervisor.qemu] kernel_params",
    "sysctl/": "it writes a guest sysctl (kernel.panic, say); set sysctls for every "
               "pod in [hypervisor.qemu] kernel_params",
}
PARAM_CHARS = frozenset(string.ascii_letters + string.digits + "._-=,:/+@")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def normalize(name: str) -> str:
    """A parameter name as the kernel matches it (`-` and `_` alike)."""
    return name.replace("-", "_")


def never_reason(name: str, *, bare: bool = False) -> str | None:
    """Why no pod may set `name` (a `bare` word: without =value), whatever the
    configuration says; None if it may be allowed."""
    if name == "--":
        return NEVER_KERNEL_PARAMS["--"]
    key = normalize(name)
    reason = NEVER_KERNEL_PARAMS.get(key)
    if reason is not None:
        return reason
    for prefix, why in _NEVER_PREFIXES.items():
        if key.startswith(prefix):
            return why
    if name != name.lower():
        # The kernel's own parameters are lower case: NAME=VALUE in capitals
        # is an environment variable for /init (PYKATA_*, PYTHON*, LD_*).
        how = "an argument" if bare else "an environment variable"
        return f"the kernel hands it to the guest's init as {how}"
    return None


def check_allowlist_entry(name: str) -> str | None:
    """Why `name` cannot be in valid_kernel_params, or None."""
    reason = never_reason(name)
    if reason is not None:
        return f"is never a pod's to set: {reason}"
    if not _NAME.fullmatch(normalize(name)):
        return ("is not a kernel parameter name (lower-case letters, digits and ._-; "
                "list the name only, without =value)")
    return None


class Refused(ValueError):
    """A pod's kernel parameter that is not allowed; `hint` says what would allow it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def check_pod_params(value: str, extra: tuple[str, ...], source: str) -> str:
    """A pod's kernel parameters, each allowed by name (pykata's list plus the
    configuration's `extra`); refused ones named. `source`: the configuration file."""
    allowed = {normalize(n) for n in (*POD_KERNEL_PARAMS, *extra)}
    words = value.split()
    for word in words:
        if not set(word) <= PARAM_CHARS:
            raise Refused(f"parameter {word!r} has characters other than letters, digits "
                          "and ._-=,:/+@")
        name = word.partition("=")[0]
        reason = never_reason(name, bare="=" not in word)
        if reason is not None:
            shown = name if name == "--" or "=" not in word else f"{name}="
            raise Refused(f"parameter {shown} is not allowed: {reason}")
        if normalize(name) not in allowed:
            raise Refused(
                f"parameter {name or word} is not one a pod may set",
                hint=f"pods may set {', '.join(sorted(allowed))}; the operator can allow "
                     f"more names in [hypervisor.qemu] valid_kernel_params in {source}")
    return " ".join(words)
