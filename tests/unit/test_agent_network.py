"""The agent's network calls refuse bad values from the host before any `ip` runs."""

from __future__ import annotations

from typing import Any

import pytest

from pykata.agent import network
from pykata.protocols import agent_pb2
from pykata.ttrpc import Code, StatusError


class NoReaper:
    """Any command run would be a failure of the check under test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a command ran ({name})")


@pytest.mark.parametrize("iface", [
    agent_pb2.Interface(hwAddr="not-a-mac"),
    agent_pb2.Interface(hwAddr="02:00:00:00:00:01; reboot"),
])
async def test_bad_macs_are_refused(iface: agent_pb2.Interface) -> None:
    with pytest.raises(StatusError) as info:
        await network.update_interface(NoReaper(), iface)  # type: ignore[arg-type]
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_a_mac_the_guest_lacks_is_not_found() -> None:
    with pytest.raises(StatusError) as info:
        await network.update_interface(NoReaper(), agent_pb2.Interface(  # type: ignore[arg-type]
            hwAddr="02:de:ad:be:ef:99"))
    assert info.value.code == Code.NOT_FOUND


@pytest.mark.parametrize("route", [
    agent_pb2.Route(dest="10.0.0.0/33"),
    agent_pb2.Route(dest="default", gateway="not-an-ip"),
    agent_pb2.Route(dest="10.0.0.0/8", device="eth0 via 1.2.3.4"),
    agent_pb2.Route(dest="10.0.0.0/8", source="x"),
])
async def test_bad_routes_are_refused(route: agent_pb2.Route) -> None:
    with pytest.raises(StatusError) as info:
        await network.update_routes(NoReaper(), agent_pb2.Routes(  # type: ignore[arg-type]
            Routes=[route]))
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_bad_neighbours_are_refused() -> None:
    bad = agent_pb2.ARPNeighbor(toIPAddress=agent_pb2.IPAddress(address="10.0.0.1"),
                                lladdr="zz", device="eth0")
    with pytest.raises(StatusError):
        await network.add_neighbors(NoReaper(), agent_pb2.ARPNeighbors(  # type: ignore[arg-type]
            ARPNeighbors=[bad]))
