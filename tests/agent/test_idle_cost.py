"""An idle agent's cost on its server does not grow with the fleet: its periodic look reads the
rollout records alone (not every node's records) and asks for no housekeeping; only a change of
the rollout records brings the full read back. A real endpoint on a real SQLite datastore; the
agent's requests are counted as they go out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from rke2certd.commands.agent_rollout import remote_store
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    PHASES,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    RolloutState,
    Slot,
)
from rke2certd.roles.agent import AgentRollout
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.create import ca_rollout, start
from rke2certd.rollout.look import LOOKS_PER_READ
from rke2certd.rollout.runner import ApplyOutcome, RolloutRunner
from rke2certd.supervisor.remote import RemoteDatastore

from .helpers import ServerNode, renew_agent, start_cluster_endpoint
from .test_cluster_route import _count_calls

NOW = datetime(2030, 1, 2, tzinfo=UTC)


def _read_kind(doc: dict[str, Any]) -> str:
    """A planning read ("everything": the range the rules read) told from a look at one
    prefix ("look"); any other request by its op."""
    if doc["op"] == "snapshot":
        return "everything" if "end" in doc else "look"
    return str(doc["op"])


@pytest.fixture
def agent_remote(
    server: ServerNode, store: SQLiteDatastore, agent_factory: Callable[..., Node]
) -> Iterator[tuple[Node, RemoteDatastore]]:
    with start_cluster_endpoint(server, store) as handle:
        node = agent_factory("agent-1", supervisor_port=handle.port)
        renew_agent(node)
        yield node, remote_store(node, lambda: server.agent_token)


def test_an_idle_agent_reads_only_the_rollout_records(
    agent_remote: tuple[Node, RemoteDatastore], store: SQLiteDatastore
) -> None:
    servers = ClusterStore(store)
    lease = store.grant_lease(600)
    for i in range(50):  # a fleet the idle agent must not read at each look
        name = f"other-{i}"
        servers.ensure_member(Member(name, ("agent",), Phase.AGENT))
        servers.register(Registration(name, ("agent",), Phase.AGENT), lease)
    node, remote = agent_remote
    role = AgentRollout(
        remote, apply=lambda r: ApplyOutcome(r.ca_generation), generation=lambda: None
    )
    runner = RolloutRunner(node, remote, role, clock=lambda: NOW, wake=lambda: None)
    runner._register(remote.grant_lease(30))
    runner.tick()  # the first look: everything
    assert runner.activity == "no rollout in progress"

    ops = _count_calls(remote)
    for _ in range(3):
        runner.next_check = 0.0  # the periodic look is due
        runner.tick()
    assert ops == ["snapshot"] * 3  # the rollout records alone; no housekeeping asked

    # a rollout appears: the next look reads everything (housekeeping is asked for only once
    # the agent reported a final status: it is what may end the rollout); e1, a server, has
    # not restarted yet, so the agent waits for it
    servers.ensure_member(Member("e1", ("etcd",), Phase.ETCD))
    servers.register(Registration("e1", ("etcd",), Phase.ETCD), lease)
    start(store, ca_rollout("g2", None, "e1", "test", NOW), NOW)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()
    assert ops == ["snapshot", "snapshot"]  # the records moved: the full read; no housekeeping
    assert runner.activity.startswith("rollout ca-g2: waiting for etcd node e1")
    assert [r.phases for r in runner.store.read().view.rollouts] == [PHASES]


def test_an_agent_waiting_in_line_looks_at_its_wait_alone(
    agent_remote: tuple[Node, RemoteDatastore], store: SQLiteDatastore
) -> None:
    """In line for its restart, its periodic look reads the rollout records, the slots of its
    phase and the statuses of the node ahead and of the one that lets it go: four small reads,
    whatever the fleet's size. A hand-off up the line (another node's slot) does not bring the
    full read back; those two nodes moving do, and so does the count of looks (the words of
    its wait, and what only a full read sees, are refreshed)."""
    servers = ClusterStore(store)
    lease = store.grant_lease(600)
    names = ["e1", "holder", "ahead"] + [f"other-{i}" for i in range(50)]
    for name in names:
        phase = Phase.ETCD if name == "e1" else Phase.AGENT
        roles = ("etcd",) if name == "e1" else ("agent",)
        servers.ensure_member(Member(name, roles, phase))
        servers.register(Registration(name, roles, phase), lease)
    r, _ = start(store, ca_rollout("g2", None, "e1", "test", NOW), NOW)
    servers.set_status(r, NodeStatus("e1", NodeState.DONE, "", "g2", NOW))
    servers.set_status(r, NodeStatus("ahead", NodeState.APPLIED, "", "g2", NOW))
    holder = Slot(Phase.AGENT, 0, "holder", r.id, NOW)
    assert servers.take_slot(holder, lease)

    node, remote = agent_remote
    role = AgentRollout(
        remote, apply=lambda r: ApplyOutcome(r.ca_generation), generation=lambda: "g2"
    )
    runner = RolloutRunner(node, remote, role, clock=lambda: NOW, wake=lambda: None)
    runner._register(remote.grant_lease(30))
    runner.tick()  # applies, then waits in line behind `ahead`
    assert "ahead last before this one" in runner.activity

    ops = _count_calls(remote)
    # the rollout records, the slots, the status of `ahead` and of the holder, whose report
    # lets `ahead` go (Wait.then)
    look = ["snapshot", "snapshot", "get", "get"]
    for _ in range(LOOKS_PER_READ - 1):
        runner.next_check = 0.0
        runner.tick()
    assert ops == look * (LOOKS_PER_READ - 1)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()  # the last look of its count
    runner.next_check = 0.0
    runner.tick()  # then everything
    assert ops[:4] == look
    assert ops[4:] == ["snapshot"]  # the full read (unchanged: no write, no housekeeping)

    # another node's slot comes and goes: a hand-off up the line, nothing this node waits on
    other = Slot(Phase.AGENT, 1, "other-0", r.id, NOW)
    assert servers.take_slot(other, lease)
    servers.release_slot(other)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()
    assert ops == look

    # the holder is done and frees its slot: `ahead` goes now, and this node reads everything
    # meanwhile (its own turn then starts from a small change); next for a slot, it waits
    servers.set_status(r, NodeStatus("holder", NodeState.DONE, "", "g2", NOW))
    servers.release_slot(holder)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()
    assert ops[:5] == [*look, "snapshot"]  # looked, then read it all
    assert "restart slot" in runner.activity

    # `ahead` takes the slot: the slot waiter's look sees the slots move and reads everything
    assert servers.take_slot(Slot(Phase.AGENT, 0, "ahead", r.id, NOW), lease)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()
    assert ops[:3] == ["snapshot", "snapshot", "snapshot"]  # looked, then read it all
    assert "1 of 1 restarting: ahead" in runner.activity

    # its link failing (the watch may have lost a wake-up only a full read would show): no
    # look, everything at each recheck. A real link, not started, with a failure recorded.
    link = role.link(node, lambda: None)
    link.take_changed()
    link._errors["watch"] = "the server went away"
    runner.link = link
    for _ in range(2):
        ops.clear()
        runner.next_check = 0.0
        runner.tick()
        assert ops == ["snapshot"]  # the full read alone, each time


def test_an_agent_done_in_a_rollout_in_progress_looks_at_the_rollout_records(
    agent_remote: tuple[Node, RemoteDatastore], store: SQLiteDatastore
) -> None:
    """Done with its restart while the rest of the line goes on: its periodic look reads the
    rollout records alone, and everything only every LOOKS_PER_READ looks or when the records
    move (the rollout ends). Its status line says the agents' phase all along."""
    servers = ClusterStore(store)
    lease = store.grant_lease(600)
    names = ["e1", "agent-1"] + [f"other-{i}" for i in range(50)]
    for name in names:
        phase = Phase.ETCD if name == "e1" else Phase.AGENT
        roles = ("etcd",) if name == "e1" else ("agent",)
        servers.ensure_member(Member(name, roles, phase))
        if name != "agent-1":
            servers.register(Registration(name, roles, phase), lease)
    r, _ = start(store, ca_rollout("g2", None, "e1", "test", NOW), NOW)
    servers.set_status(r, NodeStatus("e1", NodeState.DONE, "", "g2", NOW))
    servers.set_status(r, NodeStatus("agent-1", NodeState.DONE, "", "g2", NOW))
    for i in range(50):  # still in line
        servers.set_status(r, NodeStatus(f"other-{i}", NodeState.APPLIED, "", "g2", NOW))

    node, remote = agent_remote
    role = AgentRollout(
        remote, apply=lambda r: ApplyOutcome(r.ca_generation), generation=lambda: "g2"
    )
    runner = RolloutRunner(node, remote, role, clock=lambda: NOW, wake=lambda: None)
    runner._register(remote.grant_lease(30))
    runner.tick()
    assert runner.waiting is None  # done: nothing to wait for
    assert runner.activity == "rollout ca-g2 in phase agent; this node is done with it"

    ops = _count_calls(remote, _read_kind)
    for _ in range(LOOKS_PER_READ - 1):
        runner.next_check = 0.0
        runner.tick()
    assert ops == ["look"] * (LOOKS_PER_READ - 1)  # the rollout records alone
    # another agent's turn: its status moves, and this one does not read the fleet for it
    servers.set_status(r, NodeStatus("other-0", NodeState.DONE, "", "g2", NOW))
    ops.clear()
    runner.next_check = 0.0
    runner.tick()  # the last look of its count
    runner.next_check = 0.0
    runner.tick()  # then everything
    assert ops == ["look", "everything"]
    assert runner.activity == "rollout ca-g2 in phase agent; this node is done with it"

    # the rollout ends (its record moves): the next look reads everything
    assert servers.finish(r.id, RolloutState.DONE, "all done", NOW)
    ops.clear()
    runner.next_check = 0.0
    runner.tick()
    assert ops == ["look", "everything"]  # looked, then read it all
    assert runner.activity == "no rollout in progress"
