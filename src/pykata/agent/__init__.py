"""The pykata agent: the ttRPC server inside the guest that runs containers with crun.

It runs as the guest's PID 1 (see pykata/assets/initrd/init). Keep its import
graph small: every module here is loaded by Python under emulation on each VM
boot, and only what it imports is copied into the initrd.
"""
