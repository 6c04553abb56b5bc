"""The agent boots without protobuf's pure-Python message module (and what
it drags in), yet both backends still parse and serialise its messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import pykata.agent.main
from pykata.protocols import agent_pb2
from google.protobuf.internal import api_implementation
loaded_at_boot = {m: m in sys.modules for m in (
    "google.protobuf.text_format", "pickle", "google.protobuf.internal.containers")}
request = agent_pb2.CreateContainerRequest(container_id="c1", exec_id="e1")
back = agent_pb2.CreateContainerRequest.FromString(request.SerializeToString())
print(json.dumps({"backend": api_implementation.Type(), "boot": loaded_at_boot,
                  "round_trip": [back.container_id, back.exec_id]}))
"""


def _probe(backend: str | None) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
    if backend:
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = backend
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_under_upb_the_pure_python_message_module_is_never_loaded() -> None:
    result = _probe(None)
    assert result["backend"] == "upb"
    assert result["boot"] == {"google.protobuf.text_format": False, "pickle": False,
                              "google.protobuf.internal.containers": False}
    assert result["round_trip"] == ["c1", "e1"]


@pytest.mark.parametrize("backend", ["python", "upb"])
def test_either_backend_still_handles_the_agents_messages(backend: str) -> None:
    """The lazy module loads on first use, so the pure-Python backend works."""
    result = _probe(backend)
    assert result["backend"] == backend
    assert result["round_trip"] == ["c1", "e1"]
