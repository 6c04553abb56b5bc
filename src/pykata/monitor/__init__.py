"""The sandbox monitor: one process per OCI container that holds its VM.

Separate command invocations (`create`, `start`, `kill`, `exec`, ...) reach
the same sandbox through its control socket; the monitor's pid is the
container's pid on the host, and its death takes the VM with it (QEMU dies
with its parent).
"""
