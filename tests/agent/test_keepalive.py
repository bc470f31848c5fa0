"""Kept-alive connections between an agent's remote store and the endpoint (connections.py,
http.py, limits.py), on a real endpoint over TLS and a real SQLite store: an idle agent's calls
ride on one connection; a connection the server closed (its rest ran out, room was made, the
endpoint stopped) costs the client a new one, never a failed call; anything that did not show
a credential, or asked to, is closed after its answer."""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.supervisor import (
    CACERTS_PATH,
    CLUSTER_PATH,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    wire,
)
from rke2certd.supervisor import connections as kept
from rke2certd.supervisor import http as endpoint_http
from rke2certd.supervisor.connections import CLIENT_IDLE, MAX_IDLE, Connections
from rke2certd.supervisor.limits import ConnectionGate
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle
from tests.harness.wait import SAFETY, wait_for

from .helpers import HOST, ServerNode, agent_on, basic, register_agent, start_cluster_endpoint


def gate_of(handle: SupervisorHandle) -> ConnectionGate:
    return handle._server.gate


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed this socket (EOF readable), without reading TLS records."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0)) and socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""


def test_an_idle_agents_calls_ride_on_one_connection(
    cluster_endpoint: SupervisorHandle, remote_for: Callable[[str], tuple[Node, RemoteDatastore]]
) -> None:
    _node, remote = remote_for("agent-1")
    _cs, lease = register_agent(remote, "agent-1", 30)
    gate = gate_of(cluster_endpoint)
    before = gate.accepted
    for _ in range(10):
        remote.refresh_lease(lease)
        remote.watch_only("/rke2certd/", 1, 0.0, ["/rke2certd/nodes/agent-1"])
    assert gate.accepted == before  # the one kept since the registration: no new connection
    assert remote._connections.idle_count() == 1
    wait_for(lambda: gate.resting() == 1, what="the connection rests on the server")
    assert gate.counts() == (1, 0)  # one live, none pending (it showed a credential)


def test_a_connection_the_server_closed_at_rest_is_replaced(
    cluster_endpoint: SupervisorHandle,
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    monkeypatch: pytest.MonkeyPatch,
    events: list[dict[str, Any]],
) -> None:
    """Its rest ran out on the server; the client, which keeps it longer here, finds it closed
    when it takes it (readable at rest) and makes a new one: the call does not fail."""
    monkeypatch.setattr(endpoint_http, "KEEPALIVE_IDLE", 0.2)
    _node, remote = remote_for("agent-1")
    _cs, lease = register_agent(remote, "agent-1", 30)
    gate = gate_of(cluster_endpoint)
    wait_for(lambda: gate.counts() == (0, 0), what="the server closed the rested connection")
    before = gate.accepted
    assert remote.refresh_lease(lease) == 30
    assert gate.accepted == before + 1
    assert not [e for e in events if e["event"] in ("server_skipped", "connection_cut")]


def test_a_request_on_a_connection_closed_meanwhile_is_sent_again(
    cluster_endpoint: SupervisorHandle,
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    monkeypatch: pytest.MonkeyPatch,
    events: list[dict[str, Any]],
) -> None:
    """The race: the server closes the connection just after the client found it at rest. The
    look is forced to say "at rest" (the window is too short to hit otherwise); the request
    fails before any answer and goes once more on a new connection."""
    monkeypatch.setattr(endpoint_http, "KEEPALIVE_IDLE", 0.2)
    monkeypatch.setattr(kept, "_at_rest", lambda conn: True)
    _node, remote = remote_for("agent-1")
    _cs, lease = register_agent(remote, "agent-1", 30)
    gate = gate_of(cluster_endpoint)
    wait_for(lambda: gate.counts() == (0, 0), what="the server closed the rested connection")
    assert remote._connections.idle_count() == 1  # the client still holds it
    before = gate.accepted
    assert remote.refresh_lease(lease) == 30
    assert gate.accepted == before + 1
    assert not [e for e in events if e["event"] == "server_skipped"]


def test_a_full_endpoint_closes_the_connection_at_rest_longest_first(
    cluster_endpoint: SupervisorHandle,
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    store: SQLiteDatastore,
    events: list[dict[str, Any]],
) -> None:
    gate = gate_of(cluster_endpoint)
    (_n1, r1), (_n2, r2) = remote_for("agent-1"), remote_for("agent-2")
    register_agent(r1, "agent-1", 30)
    register_agent(r2, "agent-2", 30)
    wait_for(lambda: gate.resting() == 2, what="both connections rest")
    oldest = r1._connections._idle[next(iter(r1._connections._idle))][0][0].sock
    assert oldest is not None
    gate.resize(2)  # full: the next connection makes room
    with socket.create_connection((HOST, cluster_endpoint.port), timeout=SAFETY):
        wait_for(lambda: closed_by_peer(oldest), what="the oldest rested connection closed")
        assert gate.resting() == 1  # agent-2's is kept
        assert gate.counts() == (2, 1)  # agent-2's and the new one, pending
    assert not [e for e in events if e["event"] == "connection_cut"]  # ordinary: no warning
    assert r1.get("/rke2certd/nodes/agent-1") is not None  # its next call: a new connection


def _raw_cluster_request(
    conn: http.client.HTTPSConnection, server: ServerNode, headers: dict[str, str]
) -> http.client.HTTPResponse:
    body = json.dumps({"op": "get", "key": wire.key_out("/rke2certd/nodes/agent-9")}).encode()
    conn.request(
        "POST",
        CLUSTER_PATH,
        body=body,
        headers={
            **basic("node", server.agent_token.rsplit(":", 1)[-1]),
            "Content-Type": "application/json",
            NODE_NAME_HEADER: "agent-9",
            NODE_PASSWORD_HEADER: "p" * 32,
            **headers,
        },
    )
    response = conn.getresponse()
    response.read()
    return response


@pytest.fixture
def raw_conn(cluster_endpoint: SupervisorHandle, server: ServerNode) -> Iterator[Any]:
    context = ssl.create_default_context(cafile=str(server.file("server-ca.crt")))
    context.check_hostname = False
    conn = http.client.HTTPSConnection(HOST, cluster_endpoint.port, timeout=SAFETY, context=context)
    yield conn
    conn.close()


def test_only_an_authenticated_request_keeps_its_connection(
    raw_conn: http.client.HTTPSConnection, server: ServerNode
) -> None:
    first = _raw_cluster_request(raw_conn, server, {})
    assert first.status == 200 and not first.will_close
    assert first.getheader("Connection") is None
    sock = raw_conn.sock
    second = _raw_cluster_request(raw_conn, server, {})  # the same connection
    assert second.status == 200 and raw_conn.sock is sock
    asked = _raw_cluster_request(raw_conn, server, {"Connection": "close"})
    assert asked.status == 200 and asked.will_close  # the client asked


def test_an_unauthenticated_or_refused_request_closes_its_connection(
    raw_conn: http.client.HTTPSConnection, server: ServerNode
) -> None:
    raw_conn.request("GET", CACERTS_PATH)
    cacerts = raw_conn.getresponse()
    cacerts.read()
    assert cacerts.status == 200 and cacerts.will_close  # no credential: no second request
    refused = _raw_cluster_request(raw_conn, server, basic("node", "wrong"))
    assert refused.status == 401 and refused.will_close


def test_stopping_the_endpoint_closes_the_connections_at_rest(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
    events: list[dict[str, Any]],
) -> None:
    handle = start_cluster_endpoint(server, store)
    try:
        _node, remote = agent_on(handle.port, server, agent_factory, "agent-1")
        register_agent(remote, "agent-1", 30)
        wait_for(lambda: gate_of(handle).resting() == 1, what="the connection rests")
        conn = remote._connections._idle[next(iter(remote._connections._idle))][0][0]
    finally:
        handle.stop()
    assert conn.sock is not None
    wait_for(lambda: closed_by_peer(conn.sock), what="the stopped endpoint closed it")
    assert not [e for e in events if e["event"] == "connection_cut"]


def test_a_rotated_bundle_takes_a_connection_of_its_own(
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
) -> None:
    """A request verified against another bundle never rides on a session verified against the
    one before: another TLS context, another connection."""
    _node, remote = remote_for("agent-1")
    _cs, lease = register_agent(remote, "agent-1", 30)
    gate = gate_of(cluster_endpoint)
    before = gate.accepted
    bundle = server.file("server-ca.crt").read_bytes()
    remote._trust = lambda: bundle + b"\n"  # the same CA, another bundle: another context
    remote.refresh_lease(lease)
    assert gate.accepted == before + 1
    assert remote._connections.idle_count() == 2


# the client's own bookkeeping, on an injected clock -------------------------------------------


class FakeConn:
    """Stands in for a kept HTTPSConnection in the pool's own bookkeeping only (no network
    here: what the pool keeps and drops; the network paths are the tests above)."""

    def __init__(self, host: str = HOST, port: int = 1) -> None:
        self.host, self.port, self.closed = host, port, False
        self.sock = None
        self.timeout = 0.0

    def close(self) -> None:
        self.closed = True


def test_the_pool_keeps_a_few_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    pool = Connections(lambda: now[0])
    monkeypatch.setattr(kept, "_at_rest", lambda conn: True)
    context = ssl.create_default_context()
    conns = [FakeConn() for _ in range(MAX_IDLE + 1)]
    for c in conns:
        pool.give(c, context)  # type: ignore[arg-type]
    assert pool.idle_count() == MAX_IDLE and conns[-1].closed  # beyond MAX_IDLE: closed
    taken, reused = pool.take(HOST, 1, context, 5.0)
    assert reused and taken is conns[MAX_IDLE - 1] and taken.timeout == 5.0
    other, reused = pool.take(HOST, 1, ssl.create_default_context(), 5.0)
    assert not reused  # another context: never a kept one
    now[0] += CLIENT_IDLE + 1
    fresh, reused = pool.take(HOST, 1, context, 5.0)
    assert not reused and conns[0].closed  # kept too long: closed, a new one instead
    pool.close()
    late = FakeConn()
    pool.give(late, context)  # type: ignore[arg-type]
    assert late.closed and pool.idle_count() == 0
    for c in (other, fresh):
        c.close()


def test_a_connection_with_something_to_read_at_rest_is_not_reused(tmp_path: Path) -> None:
    """Readable at rest: the server closed it (or sent what nobody asked for)."""
    left, right = socket.socketpair()
    try:
        conn = http.client.HTTPSConnection(HOST, 1)
        conn.sock = left  # type: ignore[assignment]
        assert kept._at_rest(conn)
        right.sendall(b"x")
        assert not kept._at_rest(conn)
        conn.sock = None
        assert not kept._at_rest(conn)
    finally:
        left.close()
        right.close()
