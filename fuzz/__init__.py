"""Fuzzing pykata's untrusted-input boundaries with atheris (libFuzzer for Python).

Run ``python -m fuzz [--runs N] [--target NAME]`` from the repository root. Each
target runs in a child process of its own (`fuzz.worker`): libFuzzer ends the
process when it is done, and each child drops root before the first input.

The targets, one module each:

- ``framing``: `pykata.ttrpc.framing` and `FrameStream.read_frame` over raw bytes;
- ``agent``: the guest agent's ttRPC server, as a hostile host would drive it;
- ``shim``: the shim's task service, as a hostile containerd client would;
- ``agent_client``: the host's `AgentClient` facing a hostile agent.

Nothing in this package imports pykata at import time: the worker must import
pykata under atheris's instrumentation, which only sees modules imported after
it is switched on.
"""

from __future__ import annotations

TARGETS = ("framing", "agent", "shim", "agent_client")
DEFAULT_RUNS = 1_000_000
