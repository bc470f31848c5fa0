"""Faults during a rollout on the simulated etcd cluster: a node's daemon killed in the middle
of its restart (the rollout waits with a clear status; it goes on when the node returns, or
when it is removed with `rke2certd node remove`), an etcd member killed, a health gate that
fails (the rollout stops, later phases are untouched; `rollout resume` after the fix)."""

from __future__ import annotations

from typing import Any

import pytest

from rke2certd.plan.rollout import NodeState
from tests.harness.cluster import SimCluster
from tests.harness.etcd import EtcdCluster
from tests.harness.wait import SAFETY

from .checks import assert_all_on, assert_order, only_rollout, statuses, view, wait_rollout
from .conftest import ClusterFactory, standard_specs

pytestmark = [pytest.mark.etcd, pytest.mark.slow, pytest.mark.timeout(240)]

SLOW = {"env": {"SIM_RESTART_DELAY": "3"}}  # a restart long enough to be killed during


def _row(rollout: dict[str, Any], node: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in rollout["nodes"] if n["name"] == node)
    return found


def _kill_during_restart(cluster: SimCluster, name: str) -> str:
    cluster.stage_rotation("e1")
    rec = cluster.wait_for(
        lambda: [r for r in cluster.restarts() if r["node"] == name], 90, f"{name} restarting"
    )[0]
    cluster.kill_node(name)  # SIGKILL: the lease is left to expire, the slot with it
    rollout_id: str = rec["rollout"]
    return rollout_id


def test_node_killed_during_its_restart_waits_then_returns(sim_etcd: ClusterFactory) -> None:
    cluster = sim_etcd(standard_specs(e2=SLOW))
    rid = _kill_during_restart(cluster, "e2")

    # the others wait, and say for whom and what to do
    def waiting_for_e2() -> bool:
        r = only_rollout(cluster)
        return r is not None and "not running since" in _row(r, "e2")["message"]

    cluster.wait_for(waiting_for_e2, SAFETY, "e2 shown as down")
    r = only_rollout(cluster)
    assert r is not None and r["state"] == "active" and r["phase"] == "etcd"
    assert "rke2certd node remove e2" in _row(r, "e2")["message"]
    cluster.wait_for(
        lambda: "waiting for etcd node e2: not running since" in cluster.nodes["c1"].last_status(),
        SAFETY,
        "c1's STATUS= naming e2",
    )
    assert not [x for x in cluster.restarts(rid) if x["node"] in ("c1", "c2")]

    cluster.start_node("e2")  # back: it redoes its restart, the rollout goes on
    r = wait_rollout(cluster, "done")
    assert [x["node"] for x in cluster.restarts(rid)].count("e2") == 2
    assert_all_on(cluster, r["caGeneration"])
    assert_order(cluster, rid)


def test_node_killed_then_removed(sim_etcd: ClusterFactory) -> None:
    cluster = sim_etcd(standard_specs(c2=SLOW))
    rid = _kill_during_restart(cluster, "c2")
    refused = cluster.cli("e1", "node", "remove", "c2")  # still registered for registry-ttl
    if refused.returncode == 0:
        # A loaded machine: c2's registration expired before this CLI ran, so the first
        # remove was the one that took it out (the same end, without the wait in between).
        assert "removed node c2" in refused.stdout
    else:
        assert "is running" in refused.stderr and "--force" in refused.stderr

        def down() -> bool:
            r = only_rollout(cluster)
            return r is not None and not _row(r, "c2")["live"]

        cluster.wait_for(down, SAFETY, "c2 shown as down")
        r = only_rollout(cluster)
        assert r is not None and r["state"] == "active"
        assert "rke2certd node remove c2" in _row(r, "c2")["message"]

        res = cluster.cli("e1", "node", "remove", "c2")
        assert res.returncode == 0, res.stderr
        assert "removed node c2" in res.stdout
    r = wait_rollout(cluster, "done")
    assert sorted(n["name"] for n in r["nodes"]) == ["c1", "e1", "e2", "e3", "x1"]
    assert "c2" not in view(cluster).members
    assert_all_on(cluster, r["caGeneration"], ["c1", "e1", "e2", "e3", "x1"])
    assert_order(cluster, rid, removed=("c2",))


def test_etcd_member_killed_mid_rollout(sim_etcd: ClusterFactory, etcd3: EtcdCluster) -> None:
    cluster = sim_etcd()
    cluster.stage_rotation("e1")
    cluster.wait_for(lambda: cluster.restarts(), 90, "the first restart")
    leader = etcd3.leader()
    etcd3.kill(leader)  # the leader: an election on top of the lost endpoint
    r = wait_rollout(cluster, "done")
    assert_all_on(cluster, r["caGeneration"])
    assert_order(cluster, r["id"])
    assert sorted(x["node"] for x in cluster.restarts(r["id"])) == sorted(cluster.nodes)
    etcd3.restart(leader)


def test_failing_health_gate_stops_the_rollout(sim_etcd: ClusterFactory) -> None:
    """x1's restart does not load the new files (it serves the certificates of its first
    start): its gate sees the old certificate served, the rollout stops, and no control-plane
    node restarts. After the fix, `rollout resume` finishes it in order."""
    stale = {"env": {"SIM_STALE": "1"}, "config": {"health-timeout": 2}}
    cluster = sim_etcd(standard_specs(x1=stale))
    cluster.stage_rotation("e1")
    r = wait_rollout(cluster, "stopped")
    rid = r["id"]
    assert r["stateReason"].startswith("etcd node x1 failed: health failed: health gate did not")
    assert "has not loaded the new certificate" in r["stateReason"]

    def reported() -> bool:
        sts = statuses(cluster, rid)
        return all(n in sts for n in cluster.nodes)

    cluster.wait_for(reported, 30, "every node reporting")
    sts = statuses(cluster, rid)
    assert sts["x1"].state is NodeState.FAILED
    for cp in ("c1", "c2"):
        assert sts[cp].state is NodeState.STOPPED and sts[cp].message.startswith("stopped: ")
    restarted = {x["node"] for x in cluster.restarts(rid)}
    assert restarted.isdisjoint({"c1", "c2"})
    for e in ("e1", "e2", "e3"):  # before x1: done; after it: never restarted
        assert sts[e].state is (NodeState.DONE if e in restarted else NodeState.STOPPED)
    [failed] = cluster.nodes["x1"].log_events("rollout_failed")
    assert failed["rollout_id"] == rid and failed["node"] == "x1"
    cluster.wait_for(
        lambda: f"rollout {rid} STOPPED" in cluster.nodes["c1"].last_status(),
        10,
        "c1's STATUS= saying the rollout stopped",
    )
    table = cluster.cli("c1", "status")
    assert f"{rid}  ca  stopped" in table.stdout and "x1" in table.stdout

    # the operator fixes x1 (its restart loads the new files again) and resumes
    cluster.kill_node("x1")
    cluster.nodes["x1"].spec.env.pop("SIM_STALE")
    cluster.start_node("x1")
    res = cluster.cli("e1", "rollout", "resume", rid)
    assert res.returncode == 0, res.stderr
    r = wait_rollout(cluster, "done")
    assert_all_on(cluster, r["caGeneration"])
    assert_order(cluster, rid)
