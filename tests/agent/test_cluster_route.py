"""The endpoint's cluster route (`POST /v1-rke2/cluster`): agent-only nodes take part in
rollouts through it with `RemoteDatastore`, over the real HTTPS endpoint, on a real SQLite
datastore. An agent may read the coordination keys and write only its own records."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.agent import node_password
from rke2certd.commands.agent_rollout import agent_generation, remote_store
from rke2certd.datastore.base import EventType, LeaseNotFound
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import DatastoreError
from rke2certd.node.ca_material import disk_generation
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    PHASES,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor import CLUSTER_PATH, NODE_PASSWORD_HEADER, wire
from rke2certd.supervisor.client import RefusedError
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle, start

from .helpers import HOST, NOW, ServerNode, basic, call, register_agent, renew_agent

ROLLOUT = Rollout(
    "ca-1", RolloutKind.CA, "gen1", PHASES, None, RolloutState.ACTIVE, "test", NOW, "e1"
)


def test_an_agent_takes_part_through_the_endpoint(
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]], store: SQLiteDatastore
) -> None:
    _node, remote = remote_for("agent-1")
    cs, lease = register_agent(remote, "agent-1", 5)
    ClusterStore(store).create_rollout(ROLLOUT, NOW)  # a server started a rollout
    view = cs.read().view
    assert view.live["agent-1"].phase is Phase.AGENT and view.rollout("ca-1") is not None

    # its registration's updates, on another key than the registration (no node watches it),
    # in one request: a blind write, as on the server's own store
    calls = _count_calls(remote)
    cs.report(Registration("agent-1", ("agent",), Phase.AGENT, "t", "gen1", "ok"), lease)
    assert calls == ["put"]
    assert cs.read(everything=True).view.live["agent-1"].health == "ok"

    # its status, a slot of the agent phase on its lease, then giving it back
    cs.set_status(ROLLOUT, NodeStatus("agent-1", NodeState.APPLIED, "", "gen1", NOW))
    assert store.get(rec.status_key("ca-1", "agent-1")) is not None
    slot = Slot(Phase.AGENT, 0, "agent-1", "ca-1", NOW)
    assert cs.take_slot(slot, lease) and not cs.take_slot(slot, lease)  # CAS holds
    assert store.get(rec.slot_key(Phase.AGENT, 0)) is not None
    assert cs.release_slot(slot)
    assert cs.read().view.status(ROLLOUT, "agent-1").state is NodeState.APPLIED  # type: ignore[union-attr]

    # a watch through the endpoint sees a change made on the server's store
    start_rev = remote.snapshot(rec.PREFIX).revision + 1
    got: list[Any] = []
    watcher = threading.Thread(
        target=lambda: got.extend(remote.watch_prefix(rec.PREFIX, start_rev, 10))
    )
    watcher.start()
    ClusterStore(store).finish("ca-1", RolloutState.DONE, "all done", NOW)
    watcher.join(15)
    assert [e.kv.key for e in got] == [rec.rollout_key("ca-1")]
    assert got[0].type is EventType.PUT

    # the lease: refreshed, then revoked with the registration on it
    assert remote.refresh_lease(lease) > 0
    assert remote.revoke_lease(lease)
    assert store.get(rec.node_key("agent-1")) is None
    with pytest.raises(LeaseNotFound):
        remote.refresh_lease(lease)


def _count_calls(
    remote: RemoteDatastore, label: Callable[[dict[str, Any]], str] = lambda doc: doc["op"]
) -> list[str]:
    """The operations `remote` sends from now on, each as `label` names it (its op unless
    told); the real requests still go out."""
    ops: list[str] = []
    send = remote._call

    def counted(doc: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        ops.append(label(doc))
        return send(doc, timeout)

    remote._call = counted  # type: ignore[method-assign]
    return ops


class _Waits:
    """Stands in for RemoteDatastore's close event: records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False


def _eventually(check: Callable[[], bool]) -> None:
    for _ in range(200):
        if check():
            return
        threading.Event().wait(0.05)
    raise AssertionError("not reached in 10 s")


def test_a_busy_server_answers_watches_at_once_and_loses_no_change(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
    events: list[dict[str, Any]],
) -> None:
    """Beyond the long polls a server holds (here 1), a watch gets the changes so far and a
    time to wait; the agent waits it (spread out), and asks again from the same revision, so
    that it sees every change. Once a place is free, its watch is a long poll again."""
    api = ClusterAPI(
        store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout), max_watches=1
    )
    handle = start(server.node, host=HOST, port=0, cluster=api)
    try:
        remotes = []
        for name in ("agent-1", "agent-2"):
            node = agent_factory(name, supervisor_port=handle.port)
            renew_agent(node)
            remotes.append(remote_store(node, lambda: server.agent_token))
        first, second = remotes
        start_rev = store.snapshot(rec.PREFIX).revision + 1
        held: list[Any] = []
        poll = threading.Thread(
            target=lambda: held.extend(first.watch_prefix(rec.PREFIX, start_rev, 20))
        )
        poll.start()
        _eventually(lambda: api._watching == 1)

        waits = _Waits()
        second._closed = waits  # type: ignore[assignment]
        calls = _count_calls(second)
        assert second.watch_prefix(rec.PREFIX, start_rev, 20) == []  # nothing yet: wait
        assert calls == ["watch"] and len(waits.waits) == 1
        assert wire.BUSY_RETRY_SECONDS / 2 <= waits.waits[0] <= wire.BUSY_RETRY_SECONDS
        assert api._watching == 1  # the busy answer held no place
        assert second.watch_prefix(rec.PREFIX, start_rev, 20) == []  # logged once, not again
        full = [e for e in events if e["event"] == "cluster_watches_full"]
        assert len(full) == 1 and full[0]["node"] == "agent-2" and full[0]["limit"] == 1
        assert "poll every 5-10 s" in full[0]["reason"]
        waits.waits.pop()

        ClusterStore(store).create_rollout(ROLLOUT, NOW)
        poll.join(15)
        assert [e.kv.key for e in held] == [rec.rollout_key("ca-1")]
        got = second.watch_prefix(rec.PREFIX, start_rev, 20)  # the change, from its revision
        assert [e.kv.key for e in got] == [rec.rollout_key("ca-1")]
        assert len(waits.waits) == 1  # events come back at once, with no wait

        # the long poll has ended: the next watch holds the place and waits for a change
        later: list[Any] = []
        after = got[-1].kv.mod_revision + 1
        poll = threading.Thread(
            target=lambda: later.extend(second.watch_prefix(rec.PREFIX, after, 20))
        )
        poll.start()
        _eventually(lambda: api._watching == 1)
        ClusterStore(store).finish("ca-1", RolloutState.DONE, "all done", NOW)
        poll.join(15)
        assert [e.kv.key for e in later] == [rec.rollout_key("ca-1")]
        assert len(waits.waits) == 1 and api._watching == 0
    finally:
        handle.stop()


def test_housekeeping_and_generation_are_the_servers(
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    store: SQLiteDatastore,
    server: ServerNode,
) -> None:
    node, remote = remote_for("agent-1")
    cs, _lease = register_agent(remote, "agent-1", 5)
    ClusterStore(store).create_rollout(ROLLOUT, NOW)
    cs.set_status(ROLLOUT, NodeStatus("agent-1", NodeState.FAILED, "health gate failed"))
    assert remote.housekeep()  # the server stops the rollout an agent cannot write
    r = cs.read().view.rollout("ca-1")
    assert r is not None and r.state is RolloutState.STOPPED
    assert "agent node agent-1 failed: health gate failed" in r.state_reason
    # the agent holds the bundles the server serves: it is on the server's generation
    assert agent_generation(node, remote) == disk_generation(server.node.layout) is not None
    node.layout.agent_client_ca.write_bytes(b"")
    assert agent_generation(node, remote) is None


def _raw(
    endpoint: SupervisorHandle,
    server: ServerNode,
    doc: object,
    node: str | None = "agent-1",
    password: str | None = None,
) -> tuple[int, str]:
    headers = {**basic("node", server.password), "Content-Type": "application/json"}
    if node is not None:
        headers["rke2-Node-Name"] = node
    if password is not None:
        headers[NODE_PASSWORD_HEADER] = password
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    reply = call(endpoint.port, server.file("server-ca.crt"), "POST", CLUSTER_PATH, body, headers)
    return reply.status, reply.body.decode(errors="replace")


def test_a_lost_lease_is_a_coded_refusal(
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server says `lease-not-found` in a header, not only in words; the agent maps that
    code, and nothing else (not a 404 by itself, not the operation), to LeaseNotFound."""
    agent_node, remote = remote_for("agent-1")
    headers = {
        **basic("node", server.password),
        "Content-Type": "application/json",
        "rke2-Node-Name": "agent-1",
        NODE_PASSWORD_HEADER: node_password(agent_node),
    }
    body = json.dumps({"op": "refresh_lease", "lease": 987654321}).encode()
    reply = call(
        cluster_endpoint.port, server.file("server-ca.crt"), "POST", CLUSTER_PATH, body, headers
    )
    assert reply.status == 404
    assert reply.headers[wire.ERROR_HEADER.lower()] == wire.LEASE_NOT_FOUND
    with pytest.raises(LeaseNotFound):
        remote.refresh_lease(987654321)

    # A stand-in for a server's answer (no real server answers a lease op 404 without the
    # code): the status alone does not make a lost lease.
    def uncoded(_doc: dict[str, Any], _timeout: float) -> dict[str, Any]:
        raise RefusedError("the server refused POST /v1-rke2/cluster: 404 gone", 404)

    monkeypatch.setattr(remote, "_post", uncoded)
    with pytest.raises(DatastoreError) as err:
        remote.refresh_lease(987654321)
    assert not isinstance(err.value, LeaseNotFound)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_an_expired_lease_is_not_found_on_a_server_that_did_not_grant_it(
    server: ServerNode, agent_factory: Callable[..., Node], tmp_path: Path
) -> None:
    """An agent's lease, granted by one server, expires while the agent is cut off; its owner
    key goes with it. Another server must answer the agent's next write on it with the coded
    "lease not found" (so the agent takes a new lease and registers again), not with the 403
    that a live lease of another node gets. The datastore runs on an injected clock."""
    now = [NOW]
    with SQLiteDatastore(tmp_path / "coord.sqlite", clock=lambda: now[0]) as ds:
        granting = ClusterAPI(ds, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
        handle = start(server.node, host=HOST, port=0, cluster=api)
        try:
            node = agent_factory("agent-1", supervisor_port=handle.port)
            renew_agent(node)
            remote = remote_store(node, lambda: server.agent_token)
            # the agent's first server: its lease, its registration on it
            lease = granting.handle("agent-1", {"op": "grant_lease", "ttl": 30})["lease"]
            reg = Registration("agent-1", ("agent",), Phase.AGENT, "t", None)
            put = {
                "op": "put",
                "key": wire.key_out(rec.node_key("agent-1")),
                "value": wire.b64(rec.encode_registration(reg)),
                "lease": lease,
            }
            granting.handle("agent-1", put)
            assert ds.get(rec.node_key("agent-1")) is not None
            cs = ClusterStore(remote)  # the agent, moved to this server

            now[0] = NOW + timedelta(seconds=31)  # the lease expires
            assert not ds.lease_alive(lease)
            before = {kv.key: kv.value for kv in ds.get_prefix("/")}
            for what, attempt in [
                ("a report", lambda: cs.report(reg, lease)),
                ("a registration", lambda: cs.register(reg, lease)),
                ("a refresh", lambda: remote.refresh_lease(lease)),
            ]:
                with pytest.raises(LeaseNotFound):
                    attempt()
                assert {kv.key: kv.value for kv in ds.get_prefix("/")} == before, what

            # what the agent then does: a new lease, the registration on it
            fresh = remote.grant_lease(30)
            cs.register(reg, fresh)
            again = ds.get(rec.node_key("agent-1"))
            assert again is not None and again.lease == fresh
        finally:
            handle.stop()


def test_refusals_change_nothing(
    remote_for: Callable[[str], tuple[Node, RemoteDatastore]],
    store: SQLiteDatastore,
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
) -> None:
    agent_node, remote = remote_for("agent-1")
    cs, lease = register_agent(remote, "agent-1", 5)
    own_password = node_password(agent_node)
    other = ClusterStore(store)
    server_lease = store.grant_lease(30)
    other.register(Registration("e1", ("etcd",), Phase.ETCD, "t", None), server_lease)
    other.create_rollout(ROLLOUT, NOW)
    store.create("/bootstrap/secret", b"ciphertext")
    before = {kv.key: kv.value for kv in store.get_prefix("/")}

    refused: list[tuple[str, Callable[[], object]]] = [
        (
            "another node's registration",
            lambda: cs.register(Registration("e1", ("etcd",), Phase.ETCD, "t", None), lease),
        ),
        (
            "a server phase",
            lambda: cs.register(Registration("agent-1", ("etcd",), Phase.ETCD, "t", None), lease),
        ),
        (
            "another node's membership",
            lambda: remote.create(
                rec.member_key("a2"), rec.encode_member(Member("a2", ("agent",), Phase.AGENT))
            ),
        ),
        (
            "a status under another name",
            lambda: remote.create(
                rec.status_key("ca-1", "agent-1"),
                rec.encode_status(NodeStatus("e1", NodeState.DONE)),
            ),
        ),
        ("another node's status", lambda: cs.set_status(ROLLOUT, NodeStatus("e1", NodeState.DONE))),
        (
            "another node's status, old layout",
            lambda: remote.create(
                f"{rec.ROLLOUTS}ca-1/status/e1", rec.encode_status(NodeStatus("e1", NodeState.DONE))
            ),
        ),
        (
            "another node's updates",
            lambda: cs.report(Registration("e1", ("etcd",), Phase.ETCD, "t", None), server_lease),
        ),
        (
            "another node's updates, as its own",
            lambda: remote.create(
                rec.update_key("e1"),
                rec.encode_registration(
                    Registration("agent-1", ("agent",), Phase.AGENT, "t", None)
                ),
            ),
        ),
        (
            "a server's wake key",
            lambda: cs.wake("e1", rec.encode_wake("agent-1", "ca-1", NOW), lease),
        ),
        ("its own wake key", lambda: remote.put(rec.wake_key("agent-1"), b"{}")),
        (
            "a put of another node's updates",
            lambda: remote.put(
                rec.update_key("e1"),
                rec.encode_registration(Registration("e1", ("etcd",), Phase.ETCD, "t", None)),
            ),
        ),
        (
            "a put on a server's lease",
            lambda: remote.put(
                rec.update_key("agent-1"),
                rec.encode_registration(
                    Registration("agent-1", ("agent",), Phase.AGENT, "t", None)
                ),
                server_lease,
            ),
        ),
        (
            "a rollout record",
            lambda: (
                other.ds.get(rec.rollout_key("ca-1")) and remote.delete(rec.rollout_key("ca-1"))
            ),
        ),
        ("an etcd slot", lambda: cs.take_slot(Slot(Phase.ETCD, 0, "agent-1", "ca-1"), lease)),
        (
            "a slot for another node",
            lambda: remote.create(
                rec.slot_key(Phase.AGENT, 1), rec.encode_slot(Slot(Phase.AGENT, 1, "a2", "ca-1"))
            ),
        ),
        (
            "a key on a server's lease",
            lambda: remote.compare_and_swap(
                rec.status_key("ca-1", "agent-1"),
                rec.encode_status(NodeStatus("agent-1", NodeState.APPLIED)),
                0,
                server_lease,
            ),
        ),
        ("reading outside /rke2certd/", lambda: remote.get("/bootstrap/secret")),
        ("listing outside /rke2certd/", lambda: remote.snapshot("/")),
        ("watching outside /rke2certd/", lambda: remote.watch_prefix("/bootstrap/", 1, 1)),
    ]
    for what, attempt in refused:
        with pytest.raises(DatastoreError) as err:
            attempt()
        assert "403" in str(err.value), what
    assert {kv.key: kv.value for kv in store.get_prefix("/")} == before
    # another node's lease is "not found" for an agent: it neither refreshes nor ends it
    for attempt in (remote.refresh_lease, remote.revoke_lease):
        with pytest.raises(LeaseNotFound):
            attempt(server_lease)
    assert store.refresh_lease(server_lease) > 0
    assert {kv.key: kv.value for kv in store.get_prefix("/")} == before

    bad: list[tuple[object, str | None, int, str]] = [
        (b"not json", "agent-1", 400, "not JSON"),
        ({"op": "nope"}, "agent-1", 400, "unknown operation"),
        ([], "agent-1", 400, "JSON object"),
        ({"op": "get"}, "agent-1", 400, "base64"),
        ({"op": "get", "key": "!!"}, "agent-1", 400, "base64"),
        ({"op": "put", "key": _b64("/rke2certd/updates/agent-1")}, "agent-1", 400, "value"),
        ({"op": "grant_lease", "ttl": 100000}, "agent-1", 400, "at most"),
        ({"op": "watch", "prefix": _b64("/rke2certd/"), "start_revision": 0}, "agent-1", 400, ""),
        ({"op": "get", "key": _b64("/rke2certd/nodes/e1")}, None, 400, "rke2-Node-Name"),
    ]
    for doc, node, status, text in bad:
        got, body = _raw(cluster_endpoint, server, doc, node, own_password)
        assert got == status and text in body, (doc, got, body)
    # wrong credentials: 401 before anything is read
    reply = call(
        cluster_endpoint.port,
        server.file("server-ca.crt"),
        "POST",
        CLUSTER_PATH,
        b"{}",
        {**basic("node", "wrong"), "rke2-Node-Name": "agent-1"},
    )
    assert reply.status == 401
    assert {kv.key: kv.value for kv in store.get_prefix("/")} == before


def test_a_server_without_datastore_says_so(endpoint: SupervisorHandle, server: ServerNode) -> None:
    status, body = _raw(endpoint, server, {"op": "get", "key": _b64("/rke2certd/x")})
    assert status == 503 and "no datastore" in body
