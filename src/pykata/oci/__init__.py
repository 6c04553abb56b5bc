"""`pykata-oci`: the runc-compatible command line docker and podman call.

docker 20.10 (through containerd's runc shim) and podman (through conmon)
run a custom runtime only as a binary that takes runc's verbs and flags and
behaves as runc does. `pykata-oci` is that binary; every container it
creates runs in a VM of its own, held by a monitor process, the owner of its
pod (`pykata.oci.monitor`). `pykata run -- CMD` stays the convenience for people.
"""
