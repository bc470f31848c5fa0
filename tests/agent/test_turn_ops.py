"""An agent's turn in few requests: its report and the slot it frees in one (`cas_delete`), a
slot taken and the slots read after it in one (`create_snapshot`), each key checked as it is
alone; an older server without them is asked one request each. A real endpoint on a real
SQLite datastore; the agent's requests are counted as they go out."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from rke2certd.commands.agent import node_password
from rke2certd.datastore.base import EventType
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    NodeState,
    NodeStatus,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle, start

from .helpers import HOST, NOW, ServerNode, agent_on, register_agent
from .test_cluster_route import _count_calls, _raw

ROLLOUT = Rollout(
    "ca-1", RolloutKind.CA, "gen1", (Phase.AGENT,), None, RolloutState.ACTIVE, "test", NOW, "e1"
)
SLOT0 = rec.slot_key(Phase.AGENT, 0)


class OlderClusterAPI(ClusterAPI):
    """A server from before the combined operations: it answers them `unknown operation`."""

    _op_cas_delete = None
    _op_create_snapshot = None


def _endpoint(server: ServerNode, store: SQLiteDatastore, api: type[ClusterAPI]) -> Any:
    cluster = api(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
    return start(server.node, host=HOST, port=0, cluster=cluster)


def _agent(
    handle: SupervisorHandle, server: ServerNode, agent_factory: Callable[..., Node], name: str
) -> tuple[Node, RemoteDatastore, ClusterStore, int]:
    node, remote = agent_on(handle.port, server, agent_factory, name)
    cs, lease = register_agent(remote, name, 30)
    return node, remote, cs, lease


def _turn(cs: ClusterStore, name: str, lease: int) -> tuple[bool, rec.Parsed, rec.Parsed]:
    """Applied, then the slot taken: (taken, the read before, the read with the slots after)."""
    cs.set_status(ROLLOUT, NodeStatus(name, NodeState.APPLIED, "", "gen1", NOW))
    before = cs.read()
    taken, after = cs.take_slot_and_reread(Slot(Phase.AGENT, 0, name, "ca-1", NOW), lease, before)
    return taken, before, after


def test_a_turn_takes_and_frees_its_slot_in_one_request_each(
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
) -> None:
    ClusterStore(store).create_rollout(ROLLOUT, NOW)
    _node, remote, cs, lease = _agent(cluster_endpoint, server, agent_factory, "agent-1")
    _n2, _remote2, cs2, lease2 = _agent(cluster_endpoint, server, agent_factory, "agent-2")

    ops = _count_calls(remote)
    taken, _before, after = _turn(cs, "agent-1", lease)
    assert ops == ["get", "cas", "snapshot", "create_snapshot"]  # status; read; slot + slots
    assert taken and [s.node for s in after.view.slots] == ["agent-1"]
    slot, slot_kv = after.view.slots[0], after.kvs[SLOT0]

    # the next in line finds it taken: nothing written, the holder in the slots it gets back
    lost, _b, seen = _turn(cs2, "agent-2", lease2)
    assert not lost and [s.node for s in seen.view.slots] == ["agent-1"]

    ops.clear()
    start_rev = store.snapshot(rec.PREFIX).revision + 1
    done = NodeStatus("agent-1", NodeState.DONE, "", "gen1", NOW, NOW, NOW)
    written = cs.report_and_release(ROLLOUT, done, after, slot, slot_kv)
    assert ops == ["cas_delete"] and written.state is NodeState.DONE
    # one transaction: a watcher woken by either change, and any read, sees both
    events = store.watch_prefix(rec.PREFIX, start_rev, 0)
    assert [(e.type, e.kv.key) for e in events] == [
        (EventType.PUT, rec.status_key("ca-1", "agent-1")),
        (EventType.DELETE, SLOT0),
    ]
    assert cs.read().view.status(ROLLOUT, "agent-1").state is NodeState.DONE  # type: ignore[union-attr]

    # a report on a read that is no longer current: the two requests, the slot freed anyway
    taken, _b, after = _turn(cs2, "agent-2", lease2)
    assert taken
    cs2.set_status(ROLLOUT, NodeStatus("agent-2", NodeState.APPLIED, "again", "gen1", NOW))
    slot, slot_kv = after.view.slots[0], after.kvs[SLOT0]
    done2 = NodeStatus("agent-2", NodeState.DONE, "", "gen1", NOW, NOW, NOW)
    cs2.report_and_release(ROLLOUT, done2, after, slot, slot_kv)
    assert store.get(SLOT0) is None
    assert cs.read().view.status(ROLLOUT, "agent-2").state is NodeState.DONE  # type: ignore[union-attr]


def test_an_older_server_is_asked_one_request_each(
    server: ServerNode, store: SQLiteDatastore, agent_factory: Callable[..., Node]
) -> None:
    ClusterStore(store).create_rollout(ROLLOUT, NOW)
    with _endpoint(server, store, OlderClusterAPI) as handle:
        _node, remote, cs, lease = _agent(handle, server, agent_factory, "agent-1")
        ops = _count_calls(remote)
        taken, _before, after = _turn(cs, "agent-1", lease)
        assert ops == ["get", "cas", "snapshot", "create_snapshot", "create", "snapshot"]
        assert taken and [s.node for s in after.view.slots] == ["agent-1"]
        ops.clear()
        done = NodeStatus("agent-1", NodeState.DONE, "", "gen1", NOW, NOW, NOW)
        cs.report_and_release(ROLLOUT, done, after, after.view.slots[0], after.kvs[SLOT0])
        assert ops == ["cas_delete", "cas", "delete"]
        assert store.get(SLOT0) is None
        assert cs.read().view.status(ROLLOUT, "agent-1").state is NodeState.DONE  # type: ignore[union-attr]
        # known now: not asked again at each turn
        ops.clear()
        again = Slot(Phase.AGENT, 0, "agent-1", "ca-1")
        assert cs.take_slot_and_reread(again, lease, after)[0]
        assert ops == ["create", "snapshot"]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def test_combined_operations_refuse_what_either_part_would(
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
) -> None:
    ClusterStore(store).create_rollout(ROLLOUT, NOW)
    node, _remote, _cs, lease = _agent(cluster_endpoint, server, agent_factory, "agent-1")
    _n2, _remote2, cs2, lease2 = _agent(cluster_endpoint, server, agent_factory, "agent-2")
    assert _turn(cs2, "agent-2", lease2)[0]  # agent-2 holds slot 0
    server_lease = store.grant_lease(30)
    before = {kv.key: kv.value for kv in store.get_prefix("/")}
    mine = _b64(rec.status_key("ca-1", "agent-1"))
    done = _b64(rec.encode_status(NodeStatus("agent-1", NodeState.DONE)))
    slot1 = rec.encode_slot(Slot(Phase.AGENT, 1, "agent-1", "ca-1"))

    def cas_delete(**over: object) -> dict[str, object]:
        doc = {"op": "cas_delete", "key": mine, "value": done, "expected_mod_revision": 0}
        return {**doc, "delete_key": _b64(SLOT0), **over}

    def create_snapshot(**over: object) -> dict[str, object]:
        doc = {"op": "create_snapshot", "key": _b64(rec.slot_key(Phase.AGENT, 1))}
        return {**doc, "value": _b64(slot1), "prefix": _b64(rec.SLOTS), "lease": lease, **over}

    cases: list[tuple[dict[str, object], int, str]] = [
        (cas_delete(), 403, "held by another node"),  # agent-2's slot
        (cas_delete(delete_key=_b64(rec.status_key("ca-1", "agent-2"))), 403, "not this agent"),
        (cas_delete(key=_b64(rec.status_key("ca-1", "agent-2"))), 403, "not this agent"),
        (cas_delete(value=_b64(rec.encode_status(NodeStatus("e1", NodeState.DONE)))), 403, ""),
        (cas_delete(delete_key=mine), 400, "another key"),
        (cas_delete(expected_mod_revision=None), 400, "expected_mod_revision"),
        (cas_delete(delete_expected_mod_revision="1"), 400, "delete_expected_mod_revision"),
        (cas_delete(delete_key=None), 400, "delete_key"),
        (
            cas_delete(delete_key=_b64(rec.slot_key(Phase.AGENT, 1)), lease=server_lease),
            403,
            "not this agent's",
        ),
        (create_snapshot(prefix=_b64("/bootstrap/")), 403, "only keys under"),
        (create_snapshot(prefix=None), 400, "prefix"),
        (create_snapshot(value=_b64(rec.encode_slot(Slot(Phase.AGENT, 1, "a2", "ca-1")))), 403, ""),
        (create_snapshot(key=_b64(rec.slot_key(Phase.ETCD, 0))), 403, "only its own"),
        (create_snapshot(lease=server_lease), 403, "not this agent's"),
        (create_snapshot(lease=lease2), 403, "not this agent's"),
    ]
    password = node_password(node)
    for doc, status, text in cases:
        got, body = _raw(cluster_endpoint, server, doc, "agent-1", password)
        assert got == status and text in body, (doc, got, body)
    assert {kv.key: kv.value for kv in store.get_prefix("/")} == before
