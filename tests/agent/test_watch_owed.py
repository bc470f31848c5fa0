"""An agent's long poll after a change woke its main loop: the poll waits for what the next
step waits for, and while the main loop takes long to say (an apply while the whole fleet
applies), looks quickly instead of holding a long poll on the old keys. A real endpoint on a
real SQLite datastore; the agent's polls are counted as they go out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    NodeState,
    NodeStatus,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
    Wait,
)
from rke2certd.rollout import link as link_module
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.link import _Feed, interest, relayed_link, server_filter
from rke2certd.supervisor import wire
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle

from .helpers import NOW, ServerNode, agent_on, register_agent

ROLLOUT = Rollout(
    "ca-1", RolloutKind.CA, "gen1", (Phase.AGENT,), None, RolloutState.ACTIVE, "test", NOW, "e1"
)


def _agent(
    handle: SupervisorHandle, server: ServerNode, agent_factory: Callable[..., Node], name: str
) -> tuple[Node, RemoteDatastore]:
    node, remote = agent_on(handle.port, server, agent_factory, name)
    register_agent(remote, name, 30)
    return node, remote


def test_a_watch_owed_a_new_interest_looks_quickly_not_with_the_old_keys(
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A change woke the main loop; the watch waits (INTEREST_WAIT) for what the next step
    waits for. A step that takes longer (an apply while the whole fleet applies) gets quick
    looks meanwhile: a long poll kept to the old keys would hold back the change the next
    step waits for (the node ahead reporting) until it timed out."""
    monkeypatch.setattr(link_module, "INTEREST_WAIT", 0.0)  # the main loop is late already
    servers = ClusterStore(store)
    servers.create_rollout(ROLLOUT, NOW)
    node, remote = _agent(cluster_endpoint, server, agent_factory, "agent-1")
    polls: list[float] = []
    send = remote._call

    def counted(doc: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if doc["op"] == "watch":
            polls.append(doc["timeout"])
        return send(doc, timeout)

    remote._call = counted  # type: ignore[method-assign]
    link = relayed_link(node, lambda: remote, lambda: None)
    read = store.snapshot(rec.PREFIX).revision
    barrier = Wait(ROLLOUT, "waiting", "e1", "barrier", pending=("e1",))
    link.set_interest(interest(barrier, Phase.AGENT), read, server_filter(barrier, Phase.AGENT))
    servers.set_status(ROLLOUT, NodeStatus("e1", NodeState.DONE, "", "gen1", NOW))
    feed = _Feed(None, revision=read + 1)
    link._follow(remote, feed)  # the barrier opens: the main loop is woken
    assert link.take_changed() and polls == [wire.MAX_WATCH_SECONDS]
    link._follow(remote, feed)  # it is still applying: a quick look
    assert polls[-1] == 0.0

    queue = Wait(ROLLOUT, "waiting", "agent-2", "queue")
    link.set_interest(
        interest(queue, Phase.AGENT), feed.revision - 1, server_filter(queue, Phase.AGENT)
    )
    servers.set_status(ROLLOUT, NodeStatus("agent-2", NodeState.DONE, "", "gen1", NOW))
    link._follow(remote, feed)  # the next step said: a long poll on its keys, woken at once
    assert polls[-1] == wire.MAX_WATCH_SECONDS and link.take_changed()
