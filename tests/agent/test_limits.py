"""supervisor/limits.py: the endpoint's connection and long-poll limits from the fleet's size
and the host's open-file limit (pure)."""

from __future__ import annotations

import pytest

from rke2certd.supervisor import MAX_CONNECTIONS
from rke2certd.supervisor.limits import MAX, fleet_limits


def test_a_small_fleet_keeps_the_defaults() -> None:
    limits = fleet_limits(10, 3, 1024)
    assert (limits.connections, limits.watches) == (MAX_CONNECTIONS, MAX_CONNECTIONS * 3 // 4)


@pytest.mark.parametrize(("agents", "servers"), [(300, 3), (1000, 3), (1000, 5), (5000, 10)])
def test_every_agent_of_a_dead_servers_share_gets_a_long_poll(agents: int, servers: int) -> None:
    limits = fleet_limits(agents, servers, 1 << 20)
    share = -(-agents // (servers - 1))
    assert limits.watches >= share * 5 // 4
    assert limits.watches == limits.connections * 3 // 4
    assert f"{agents} agent(s) over {servers} server(s)" in limits.reason


def test_the_host_caps_it() -> None:
    assert fleet_limits(100_000, 2, 1 << 20).connections == MAX
    assert fleet_limits(1000, 3, 1024).connections == 256  # a quarter of 1024 files
    need = fleet_limits(1000, 3, 1 << 20).connections
    assert fleet_limits(1000, 3, 4096).connections == need < 1024  # within what the host allows


def test_one_server_alone_takes_the_whole_fleet() -> None:
    assert fleet_limits(200, 1, 1 << 20).watches >= 250
