"""A node joining is never reported down: a server's housekeeping that runs between any two of
the joining agent's writes (its registration and its membership) finds nothing to mark. A real
endpoint on a real SQLite file; the servers' housekeeping runs on its own connection, right
after each write the endpoint makes for the agent (a subclass that hooks the writes)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rke2certd.commands.agent_rollout import remote_store
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.roles.agent import AgentRollout
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.housekeeping import housekeep
from rke2certd.rollout.runner import ApplyOutcome, RolloutRunner
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.server import start as start_endpoint

from .helpers import HOST, ServerNode, renew_agent

NOW = datetime(2030, 1, 2, tzinfo=UTC)


class HousekeptAfterEachWrite(SQLiteDatastore):
    """The endpoint's datastore: after each write, another server housekeeps."""

    servers: ClusterStore | None = None
    rounds = 0

    def _write(self, key: str, value: bytes, expected: int | None, lease: int | None) -> bool:
        wrote = super()._write(key, value, expected, lease)
        if self.servers is not None:
            self.rounds += 1
            housekeep(self.servers, self.servers.read(), NOW)
        return wrote


def test_a_joining_agent_is_never_marked_down(
    server: ServerNode,
    agent_factory: Callable[..., Node],
    tmp_path: Path,
    events: list[dict[str, Any]],
) -> None:
    path = tmp_path / "coord.sqlite"
    with HousekeptAfterEachWrite(path) as ds, SQLiteDatastore(path) as other:
        ds.servers = ClusterStore(other)
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
        with start_endpoint(server.node, host=HOST, port=0, cluster=api) as handle:
            node = agent_factory("agent-1", supervisor_port=handle.port)
            renew_agent(node)
            remote = remote_store(node, lambda: server.agent_token)
            role = AgentRollout(
                remote, apply=lambda r: ApplyOutcome(r.ca_generation), generation=lambda: None
            )
            runner = RolloutRunner(node, remote, role, clock=lambda: NOW, wake=lambda: None)
            runner._register(remote.grant_lease(30))
        member = ds.get(rec.member_key("agent-1"))
        assert member is not None and rec.decode_member(member).down_since is None
        assert ds.rounds >= 2  # housekept after the registration and after the membership
    assert [e for e in events if e["event"] == "node_down"] == []
