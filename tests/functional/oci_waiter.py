"""Run `pykata-oci create ... --pid-file F` as a subreaper and wait for the pid.

This is what containerd's runc shim and conmon do: they become child
subreapers, run `create`, read the pid file, and take the container's exit
from that pid's exit. Prints one JSON line after create ({"rc", "pid"}) and
one when the pid ended ({"status", "stdout", "stderr"}). The container's
stdin is this process's stdin; its stdout and stderr are pipes read here.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    argv: list[str] = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    pid_file = argv[argv.index("--pid-file") + 1]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            chunks[fd].append(data)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for t in readers:
        t.start()
    create = subprocess.Popen(argv, stdin=sys.stdin.fileno(), stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    rc = create.wait()
    pid = 0
    if rc == 0:
        with open(pid_file) as f:
            pid = int(f.read())
    print(json.dumps({"rc": rc, "pid": pid}), flush=True)
    if rc != 0:
        for t in readers:
            t.join(10)
        print(json.dumps({"status": None, "stdout": b"".join(chunks[out_r]).decode(),
                          "stderr": b"".join(chunks[err_r]).decode()}), flush=True)
        return 0
    status = None
    # Reap every orphan that lands here; the container's pid is the one asked for.
    while True:
        try:
            reaped, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if reaped == pid:
            status = os.waitstatus_to_exitcode(raw)
            break
    for t in readers:
        t.join(15)
    print(json.dumps({"status": status,
                      "stdout": b"".join(chunks[out_r]).decode(errors="replace"),
                      "stderr": b"".join(chunks[err_r]).decode(errors="replace")}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
