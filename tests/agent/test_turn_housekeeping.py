"""An agent asks its server for the cluster's housekeeping (a full read of the keys on the
server) after a final report only when that report may have ended the rollout: when no other
participant is left to report. A real endpoint on a real SQLite datastore, a real restart job;
the agent's requests are counted as they go out."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rke2certd.commands.agent_rollout import remote_store
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
)
from rke2certd.roles.agent import AgentRollout
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.runner import ApplyOutcome, RolloutRunner
from rke2certd.supervisor.server import SupervisorHandle
from tests.harness.wait import wait_for

from .helpers import NOW, ServerNode, renew_agent
from .test_cluster_route import _count_calls

ROLLOUT = Rollout(
    "ca-1", RolloutKind.CA, "gen1", (Phase.AGENT,), None, RolloutState.ACTIVE, "test", NOW, "e1"
)
SLOT0 = rec.slot_key(Phase.AGENT, 0)


@pytest.mark.parametrize("last", [False, True])
def test_a_finished_turn_asks_for_housekeeping_only_when_it_may_end_the_rollout(
    cluster_endpoint: SupervisorHandle,
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Node],
    last: bool,
) -> None:
    """The report and the slot: one request; the server's housekeeping (a full read on the
    server) only when no other participant is left to report."""
    servers = ClusterStore(store)
    servers.create_rollout(ROLLOUT, NOW)
    server_lease = store.grant_lease(600)
    servers.ensure_member(Member("agent-2", ("agent",), Phase.AGENT))
    servers.register(Registration("agent-2", ("agent",), Phase.AGENT, "t", "gen1"), server_lease)
    if last:  # agent-2 is done already (as its own report would have it)
        servers.set_status(ROLLOUT, NodeStatus("agent-2", NodeState.DONE, "", "gen1", NOW))
    node = agent_factory(
        "agent-1",
        supervisor_port=cluster_endpoint.port,
        restart_command=["true"],
        health_command=["true"],
    )
    renew_agent(node)
    remote = remote_store(node, lambda: server.agent_token)
    role = AgentRollout(
        remote, apply=lambda r: ApplyOutcome(r.ca_generation), generation=lambda: None
    )
    runner = RolloutRunner(node, remote, role, clock=lambda: NOW, wake=lambda: None)
    runner._register(remote.grant_lease(30))
    runner.tick()  # applies, takes the slot, starts its restart
    running = runner.running
    assert running is not None
    # the view kept (metrics) is the read the restart was decided on, not the tick's first
    seen = runner.view
    assert seen is not None and [s.node for s in seen.slots] == ["agent-1"]
    assert seen.status(ROLLOUT, "agent-1").state is NodeState.APPLIED  # type: ignore[union-attr]
    wait_for(lambda: running.job.done, "the restart job")

    ops = _count_calls(remote)
    runner.tick()
    assert ops.count("cas_delete") == 1 and "delete" not in ops and "cas" not in ops
    assert ("housekeep" in ops) is last
    assert store.get(SLOT0) is None
    view = servers.read().view
    assert view.status(ROLLOUT, "agent-1").state is NodeState.DONE  # type: ignore[union-attr]
    assert view.rollout("ca-1").state is (RolloutState.DONE if last else RolloutState.ACTIVE)  # type: ignore[union-attr]
