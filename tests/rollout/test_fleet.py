"""A fleet of agent-only daemons through a server's endpoint, with real `rke2certd run`
processes on the SQLite default: a rollout never waits for good on an agent that is not
running (agent-unavailable-grace, agent-unavailable: skip), and that agent catches up, and
rejoins after the rotation it missed, when its daemon returns."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from rke2certd.pki import certs
from rke2certd.pki.token import ca_hash, parse_token
from tests.harness.cluster import NodeSpec, SimCluster

from .checks import statuses, view, wait_rollout
from .conftest import ClusterFactory

pytestmark = pytest.mark.timeout(300)

AGENTS = ("a1", "a2", "a3")


def _specs() -> list[NodeSpec]:
    servers = [NodeSpec("e1", ("etcd",)), NodeSpec("c1", ("control-plane",))]
    return servers + [NodeSpec(name, ("agent",)) for name in AGENTS]


def _verify_new(cluster: SimCluster, agent: str, tmp_path: Path) -> None:
    """The agent's client cert chains to the servers' NEW client CA alone (openssl)."""
    bundle = cluster.nodes["c1"].layout.tls / "client-ca.crt"
    chain = certs.load_bundle(bundle.read_bytes(), bundle)
    root, inter = tmp_path / f"{agent}-root.pem", tmp_path / f"{agent}-inter.pem"
    root.write_bytes(certs.bundle_pem([chain[2]]))  # new intermediate, cross-signed, new root
    inter.write_bytes(certs.bundle_pem([chain[0]]))
    leaf = cluster.nodes[agent].layout.agent / "client-kubelet.crt"
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(inter), str(leaf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0 and ": OK" in res.stdout, res.stdout + res.stderr


def test_a_down_agent_is_skipped_and_catches_up_when_it_returns(
    sim_sqlite: ClusterFactory, tmp_path: Path
) -> None:
    cluster = sim_sqlite(_specs(), config={"agent-unavailable-grace": 1})
    cluster.wait_for(lambda: set(AGENTS) <= set(view(cluster).live), 30, "agents registered")
    old_hash = parse_token(_token(cluster, "a3")).ca_hash

    # a3's daemon stops before the rotation (its RKE2 stand-ins stay up, on the old certs)
    cluster.kill_node("a3", signal.SIGTERM)
    cluster.wait_for(lambda: view(cluster).members["a3"].down_since, 30, "a3 recorded down")

    cluster.stage_rotation("e1")
    r = wait_rollout(cluster, "done", timeout=180)
    rid, gen = r["id"], r["caGeneration"]
    nodes = {n["name"]: n for n in r["nodes"]}
    assert {n: nodes[n]["state"] for n in nodes} == {
        "e1": "done", "c1": "done", "a1": "done", "a2": "done", "a3": "skipped",
    }  # fmt: skip
    assert "into its turn" in nodes["a3"]["message"] and not nodes["a3"]["live"]
    assert "1 skipped" in r["stateReason"] and "a3" in r["stateReason"]
    blocked = [e for n in ("e1", "c1") for e in cluster.nodes[n].log_events("rollout_blocked")]
    assert blocked and {(e["node"], e["action"], e["rollout_id"]) for e in blocked} == {
        ("a3", "skip", rid)
    }
    assert not [x for x in cluster.restarts(rid) if x["node"] == "a3"]

    # a3 returns: its token pins the old CA; it proves the servers by the chain to the CA it
    # holds, takes the new CA and token, and restarts in a slot for the rollout it missed
    cluster.start_node("a3")
    cluster.wait_for(
        lambda: (st := statuses(cluster, rid).get("a3")) is not None and st.state.value == "done",
        120,
        "a3 caught up",
    )
    assert cluster.nodes["a3"].log_events("agent_rejoined")
    assert view(cluster).live["a3"].ca_generation == gen
    new_hash = ca_hash((cluster.nodes["c1"].layout.tls / "server-ca.crt").read_bytes())
    assert new_hash != old_hash and parse_token(_token(cluster, "a3")).ca_hash == new_hash
    _verify_new(cluster, "a3", tmp_path)
    [catch_up] = [x for x in cluster.restarts(rid) if x["node"] == "a3"]
    assert catch_up["phase"] == "agent" and catch_up["ca_generation"] == gen
    assert wait_rollout(cluster, "done")["id"] == rid  # still done; nothing else started


def _token(cluster: SimCluster, name: str) -> str:
    import yaml

    doc = yaml.safe_load((cluster.nodes[name].dir / "rke2" / "config.yaml").read_text())
    return str(doc["token"])
