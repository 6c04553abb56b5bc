"""Hypervisor drivers. QEMU is the only one; its interface is `QemuVM`."""
