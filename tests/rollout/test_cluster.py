"""The ordered rollout on simulated clusters of real `rke2certd run` processes: a three-member
TLS etcd cluster (and a shared SQLite file), three etcd nodes, two control-plane nodes and one
etcd + control-plane node. A cross-signed CA set staged on one server must reach every node in
order: etcd phase first, one node at a time, each gated on a real TLS health check."""

from __future__ import annotations

import signal
from datetime import datetime

import pytest

from rke2certd.node.ca_material import disk_generation
from tests.harness.cluster import SimCluster

from .checks import assert_all_on, assert_order, statuses, wait_rollout
from .conftest import ClusterFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # simulated clusters


def _rotate_and_check(cluster: SimCluster, reloaded: str = "c2") -> None:
    before = {disk_generation(n.layout) for n in cluster.nodes.values()}
    assert len(before) == 1 and None not in before
    # one node reloads first (SIGHUP: new connection, new watch): it must still follow
    cluster.signal_node(reloaded, signal.SIGHUP)
    cluster.wait_for(lambda: cluster.nodes[reloaded].log_events("ready"), 10, "reload done")
    cluster.wait_for(
        lambda: len(cluster.nodes[reloaded].log_events("reloading")) == 1, 10, "a reload"
    )
    staged = cluster.stage_rotation("e1")
    r = wait_rollout(cluster, "done")
    rid, gen = r["id"], r["caGeneration"]
    assert rid == f"ca-{gen}" and gen not in before
    assert r["phases"] == ["etcd", "control-plane", "agent"]
    assert r["createdBy"] == "e1" and "staged set rotation-1" in r["reason"]
    applied = list((staged.parent / ".applied").iterdir())
    assert [p.name.startswith("rotation-1-") for p in applied] == [True]

    # every node on the new generation, on disk and in its registration
    assert_all_on(cluster, gen)
    assert {n["name"]: n["state"] for n in r["nodes"]} == dict.fromkeys(cluster.nodes, "done")

    # each node restarted once, with the rollout in its environment, in order
    restarts = cluster.restarts(rid)
    assert sorted(x["node"] for x in restarts) == sorted(cluster.nodes)
    for x in restarts:
        assert x["rollout_kind"] == "ca" and x["ca_generation"] == gen
        assert x["phase"] == ("control-plane" if x["node"] in ("c1", "c2") else "etcd")
        assert x["notify_socket"] is None  # never handed to the restart command
    assert_order(cluster, rid)
    cp_begin = min(x["t"] for x in restarts if x["node"] in ("c1", "c2"))
    etcd_done = max(
        st.finished.timestamp()
        for name, st in statuses(cluster, rid).items()
        if name in ("e1", "e2", "e3", "x1") and st.finished
    )
    assert cp_begin > etcd_done

    # the journal events, with their fields
    started = [e for n in cluster.nodes.values() for e in n.log_events("rollout_started")]
    assert [(e["rollout_id"], e["ca_generation"]) for e in started] == [(rid, gen)]
    done = [e for n in cluster.nodes.values() for e in n.log_events("rollout_done")]
    assert len(done) == 1 and done[0]["rollout_id"] == rid
    for name, node in cluster.nodes.items():
        [ev] = node.log_events("rollout_node_done")
        assert (ev["node"], ev["rollout_id"], ev["phase"]) == (name, rid, restarts_phase(name))
        assert node.log_events("rollout_restarting")
    # the reloaded node followed through its new watch, not the 30 s safety re-read
    t_started = _t(started[0]["timestamp"])
    [applied] = cluster.nodes[reloaded].log_events("rollout_applied")
    assert _t(applied["timestamp"]) - t_started < 10
    # a control-plane node said in STATUS= what it was waiting for
    said = [s for _, s in cluster.nodes["c2"].statuses]
    assert any(f"rollout {rid}: waiting for" in s for s in said), said

    table = cluster.cli("e2", "status")
    assert table.returncode == 0, table.stderr
    assert f"{rid}  ca  done" in table.stdout


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def restarts_phase(name: str) -> str:
    return "control-plane" if name in ("c1", "c2") else "etcd"


@pytest.mark.etcd
def test_ordered_rollout_on_etcd(sim_etcd: ClusterFactory) -> None:
    _rotate_and_check(sim_etcd())


def test_ordered_rollout_on_sqlite(sim_sqlite: ClusterFactory) -> None:
    """All nodes on one machine, one shared SQLite file: the same order."""
    _rotate_and_check(sim_sqlite())
