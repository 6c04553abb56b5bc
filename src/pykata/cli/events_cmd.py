"""`pykata events SANDBOX_ID [--follow]`: a pod's event log, from its owner."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pykata.errors import InvalidStateError
from pykata.protocols import pod_pb2
from pykata.runtime.control_client import PodClient
from pykata.runtime.sandbox_index import find_sandbox

# How long one poll of --follow waits on the owner for a new entry.
FOLLOW_WAIT = 20.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="show a pod's event log (lifecycle, agent calls, VM exits)")
    p.add_argument("sandbox_id", metavar="SANDBOX_ID",
                   help="the pod's sandbox id (pykata-oci: the container id)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new entries until the pod ends")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=run)


def _print(entry: pod_pb2.EventEntry, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"seq": entry.seq, "time": entry.time, "kind": entry.kind,
                          "text": entry.text, "error": entry.error}), flush=True)
        return
    from pykata.runtime.event_log import EventEntry

    print(EventEntry(entry.seq, entry.time, entry.kind, entry.text, entry.error).line(),
          flush=True)


async def show(sandbox_id: str, *, follow: bool, as_json: bool) -> int:
    entry = find_sandbox(sandbox_id)
    assert entry.state is not None
    if not entry.state.control_socket:
        raise InvalidStateError(f"pod {sandbox_id} has no control socket yet (still starting?)")
    seq, first = 0, True
    async with await PodClient.connect(entry.state.control_socket, f"pod {sandbox_id}") as pod:
        while True:
            try:
                reply = await pod.events(seq, 0.0 if first else FOLLOW_WAIT)
            except InvalidStateError:
                if not first:
                    return 0  # the owner went away: the pod ended
                raise
            if reply.entries and reply.entries[0].seq > seq + 1:
                print(f"... {reply.entries[0].seq - seq - 1} older entries dropped",
                      file=sys.stderr)
            for e in reply.entries:
                _print(e, as_json)
            seq = reply.entries[-1].seq if reply.entries else max(seq, reply.last_seq)
            first = False
            if not follow:
                if reply.entries and reply.last_seq > seq:
                    continue  # more than one read's worth
                return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(show(args.sandbox_id, follow=args.follow, as_json=args.json))
