"""A renewal is a rollout too: leaves renewed on one node (here by SIGHUP, as the periodic
rescan would) restart that node only, through a slot of its phase, gated on its health."""

from __future__ import annotations

import signal

import pytest

from tests.harness.cluster import NodeSpec

from .checks import age_leaf, statuses, view
from .conftest import ClusterFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # a simulated cluster


def test_renewal_restarts_only_that_node(sim_sqlite: ClusterFactory) -> None:
    cluster = sim_sqlite(
        [
            NodeSpec("e1", ("etcd",)),
            NodeSpec("c1", ("control-plane",)),
            NodeSpec("c2", ("control-plane",)),
        ]
    )
    age_leaf(cluster, "c1", "serving-kube-apiserver", "server-ca", days=30)
    cluster.signal_node("c1", signal.SIGHUP)  # reload: rescan and renew now

    def done() -> str | None:
        rs = [r for r in view(cluster).rollouts if r.id.startswith("renewal-c1-")]
        return rs[0].id if rs and rs[0].state.value == "done" else None

    rid = cluster.wait_for(done, 60, "the renewal rollout done")
    r = view(cluster).rollout(rid)
    assert r is not None and r.kind.value == "renewal" and r.nodes == ("c1",)
    assert [p.value for p in r.phases] == ["control-plane"]
    assert "api-server" in r.reason and r.created_by == "c1"
    assert [x["node"] for x in cluster.restarts(rid)] == ["c1"]
    assert [x["node"] for x in cluster.restarts()] == ["c1"]  # nobody else restarted
    assert list(statuses(cluster, rid)) == ["c1"]
    [started] = cluster.nodes["c1"].log_events("rollout_started")
    assert started["rollout_id"] == rid and started["phase"] == "control-plane"
