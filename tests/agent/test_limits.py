"""supervisor/fleet_limits.py: the endpoint's connection and long-poll limits from the fleet's size
and the host's open-file limit (pure), and a real endpoint following a resized limit."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.supervisor import MAX_CONNECTIONS
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.fleet_limits import KEPT_PER_AGENT, MAX, fleet_limits
from rke2certd.supervisor.server import start
from tests.harness.wait import wait_for

from .helpers import HOST, ServerNode, call

NOW = datetime(2030, 1, 2, tzinfo=UTC)


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
    assert fleet_limits(1000, 3, 1 << 14).connections == need < 4096  # within what the host allows
    # each agent of a dead server's share: its long poll and its kept connections
    assert need >= 500 * 5 // 4 * (1 + KEPT_PER_AGENT)


def test_one_server_alone_takes_the_whole_fleet() -> None:
    assert fleet_limits(200, 1, 1 << 20).watches >= 250


def test_the_endpoint_follows_a_resized_limit(
    server: ServerNode, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    """The connection gate's total follows the cluster route's limit: at the limit a new
    connection makes room by cutting the oldest one that has not authenticated (the endpoint's
    defence against idle connections, supervisor/limits.py); a larger limit (the fleet grew)
    lets more in with nobody cut."""

    def open_still(sock: socket.socket) -> bool:
        sock.setblocking(False)
        try:
            return sock.recv(1) != b""
        except BlockingIOError:
            return True
        finally:
            sock.setblocking(True)

    def wait_cut(sock: socket.socket) -> None:
        sock.settimeout(30)
        assert sock.recv(1) == b""  # the server shut it down

    with SQLiteDatastore(tmp_path / "coord.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
        api.resize(2, 1)
        with start(server.node, host=HOST, port=0, cluster=api) as handle:
            held = [socket.create_connection((HOST, handle.port)) for _ in range(2)]
            try:
                held.append(socket.create_connection((HOST, handle.port)))
                wait_cut(held[0])  # the oldest, to make room for the third
                assert open_still(held[1])
                api.resize(4, 3)
                held.append(socket.create_connection((HOST, handle.port)))
                reply = call(handle.port, server.file("server-ca.crt"), "GET", "/cacerts")
                assert reply.status == 200
                assert all(open_still(sock) for sock in held[1:])  # room for all: none cut
                cut = wait_for(  # logged by the cut connection's thread
                    lambda: [e for e in events if e["event"] == "connection_cut"],
                    "a connection_cut event",
                )
                assert len(cut) == 1 and "make room" in cut[0]["reason"], cut
            finally:
                for sock in held:
                    sock.close()


def test_the_cluster_api_calls_its_resize_hooks(server: ServerNode, tmp_path: Path) -> None:
    """A follower gets the limit at once and at each resize, and nothing once it unfollows
    (a stopped endpoint)."""
    seen: list[int] = []
    with SQLiteDatastore(tmp_path / "coord.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
        api.follow_resize(seen.append)
        api.resize(40, 30)
        api.unfollow_resize(seen.append)
        api.resize(50, 37)
    assert seen == [MAX_CONNECTIONS, 40]
