"""containerd's runtime v2 shim for pykata: `containerd-shim-pykata-v2`.

containerd runs the binary with `start` to get a shim server's address, talks
to that server over ttRPC (`containerd.task.v2.Task`), and runs the binary with
`delete` to clean up after a shim that died. One server (and one VM) serves
every container of a pod.
"""
