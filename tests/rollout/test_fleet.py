"""A fleet of agent-only daemons through the servers' endpoints, with real `rke2certd run`
processes on the SQLite default: a rollout never waits for good on an agent that is not
running (agent-unavailable-grace, agent-unavailable: skip), and that agent catches up, and
rejoins after the rotation it missed, when its daemon returns; agents spread over the servers,
and when the server most of them use dies in the middle of a rollout they move and the rollout
finishes."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from rke2certd.pki import certs
from rke2certd.pki.join_token import ca_hash, parse_token
from rke2certd.plan.rollout import Member, Phase
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor.choice import preferred_order
from rke2certd.supervisor.fleet_limits import fleet_limits
from tests.harness.cluster import NodeSpec, SimCluster

from .checks import assert_order, statuses, view, wait_rollout
from .conftest import ClusterFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # simulated clusters

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
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and ": OK" in res.stdout, res.stdout + res.stderr


def test_down_agents_are_skipped_and_catch_up_when_they_return(
    sim_sqlite: ClusterFactory, tmp_path: Path
) -> None:
    """a2 and a3 are down during a CA rollout: it finishes without them. a2 returns the way a
    rebooted machine does (rke2-agent's `ExecStartPre=` renew first, then the daemon), a3 with
    its daemon alone; both rejoin through the chain to the CA they hold and catch up."""
    cluster = sim_sqlite(_specs(), config={"agent-unavailable-grace": 1})
    cluster.wait_for(lambda: set(AGENTS) <= set(view(cluster).live), 30, "agents registered")
    old_hash = parse_token(_token(cluster, "a3")).ca_hash

    # their daemons stop before the rotation (their RKE2 stand-ins stay up, on the old certs)
    for a in ("a2", "a3"):
        cluster.kill_node(a, signal.SIGTERM)
    cluster.wait_for(
        lambda: all(view(cluster).members[a].down_since for a in ("a2", "a3")), 30, "down"
    )

    cluster.stage_rotation("e1")
    r = wait_rollout(cluster, "done", timeout=180)
    rid, gen = r["id"], r["caGeneration"]
    nodes = {n["name"]: n for n in r["nodes"]}
    assert {n: nodes[n]["state"] for n in nodes} == {
        "e1": "done",
        "c1": "done",
        "a1": "done",
        "a2": "skipped",
        "a3": "skipped",
    }
    assert "into its turn" in nodes["a3"]["message"] and not nodes["a3"]["live"]
    assert "2 skipped" in r["stateReason"] and "a2, a3" in r["stateReason"]
    blocked = [e for n in ("e1", "c1") for e in cluster.nodes[n].log_events("rollout_blocked")]
    assert {(e["node"], e["action"], e["rollout_id"]) for e in blocked} == {
        ("a2", "skip", rid),
        ("a3", "skip", rid),
    }
    assert len(blocked) == 2  # once each, by the server that skipped it
    assert not [x for x in cluster.restarts(rid) if x["node"] in ("a2", "a3")]

    # a2: the startup hook alone, as before rke2-agent starts; its token pins the old CA
    res = cluster.cli("a2", "renew")
    assert res.returncode == 0, res.stdout + res.stderr
    new_hash = ca_hash((cluster.nodes["c1"].layout.tls / "server-ca.crt").read_bytes())
    assert new_hash != old_hash and parse_token(_token(cluster, "a2")).ca_hash == new_hash
    _verify_new(cluster, "a2", tmp_path)

    # both daemons return: each restarts in a slot of the rollout it missed
    for a in ("a2", "a3"):
        cluster.start_node(a, wait=False)
    for a in ("a2", "a3"):
        cluster.wait_ready(a)

    def caught_up() -> bool:
        sts = statuses(cluster, rid)
        return all((st := sts.get(a)) is not None and st.state.value == "done" for a in AGENTS)

    cluster.wait_for(caught_up, 120, "a2 and a3 caught up")
    assert cluster.nodes["a3"].log_events("agent_rejoined")  # a3 rejoined at its daemon's start
    assert not cluster.nodes["a2"].log_events("agent_rejoined")  # a2's token fitted already
    live = view(cluster).live
    assert {live[a].ca_generation for a in AGENTS} == {gen}
    assert parse_token(_token(cluster, "a3")).ca_hash == new_hash
    _verify_new(cluster, "a3", tmp_path)
    late = [x for x in cluster.restarts(rid) if x["node"] in ("a2", "a3")]
    assert sorted(x["node"] for x in late) == ["a2", "a3"]
    assert {(x["phase"], x["ca_generation"]) for x in late} == {("agent", gen)}
    assert_order(cluster, rid)  # one agent restart at a time, the catch-ups too
    assert wait_rollout(cluster, "done")["id"] == rid  # still done; nothing else started


FLEET = tuple(f"a{i}" for i in range(1, 7))


def test_agents_move_when_the_server_most_use_dies_mid_rollout(
    sim_sqlite: ClusterFactory, tmp_path: Path
) -> None:
    """Three servers, each its endpoint on its own address; six agents list all three. The
    server most of them prefer is killed once the agent phase has begun: its agents move to
    their next servers (their leases, registrations and watches go on there) and the rollout
    finishes; when it returns, they move back."""
    slow = {"SIM_RESTART_DELAY": "1.5"}
    specs = [NodeSpec("e1", ("etcd",)), NodeSpec("c1", ("control-plane",))]
    specs += [NodeSpec("c2", ("control-plane",))]
    retry = {"preferred-server-retry": 1}
    specs += [NodeSpec(a, ("agent",), env=dict(slow), config=dict(retry)) for a in FLEET]
    cluster = sim_sqlite(specs, spread=True)
    cluster.wait_for(lambda: set(FLEET) <= set(view(cluster).live), 60, "agents registered")

    port = _agent_port(cluster)
    configured = {f"https://{a}:9345": n for n, a in cluster.addresses.items()}  # as listed
    home = {a: configured[preferred_order(list(configured), a)[0]] for a in FLEET}
    server_of = {f"https://{a}:{port}": n for n, a in cluster.addresses.items()}  # as reached
    load = Counter(home.values())
    busiest, used = load.most_common(1)[0]
    assert used >= 2 and len(load) >= 2, load  # spread: not all on one server
    movers = sorted(a for a in FLEET if home[a] == busiest)

    cluster.stage_rotation("e1")
    cluster.wait_for(
        lambda: [x for x in cluster.restarts() if x["node"] in FLEET], 180, "the agent phase"
    )
    cluster.kill_node(busiest)  # SIGKILL: a crash; its RKE2 stand-ins stay up
    r = wait_rollout(cluster, "done", timeout=180)
    assert {n["name"]: n["state"] for n in r["nodes"]} == dict.fromkeys(cluster.nodes, "done")
    assert {view(cluster).live[a].ca_generation for a in FLEET} == {r["caGeneration"]}
    assert_order(cluster, r["id"])

    def moves(a: str) -> list[tuple[str, bool]]:
        return [
            (server_of[e["server_url"]], e["preferred"])
            for e in cluster.nodes[a].log_events("server_chosen")
        ]

    for a in FLEET:
        if a in movers:  # away from the dead server, never refused on the next one
            assert moves(a) and moves(a)[0][0] != busiest and not moves(a)[0][1], moves(a)
        else:
            assert moves(a) == [], (a, moves(a))
        log = (cluster.nodes[a].dir / "daemon.log").read_text()
        assert "is not this agent's" not in log

    # the dead server returns: its agents go home
    cluster.start_node(busiest)
    cluster.wait_for(
        lambda: all((busiest, True) in moves(a) for a in movers), 60, "the agents moved back"
    )


def test_a_servers_limits_follow_a_fleet_that_joins_while_nothing_else_happens(
    sim_sqlite: ClusterFactory,
) -> None:
    """A fleet joining wakes nothing a server's rollout waits on, and this server's rollout
    reads are an hour apart (RKE2CERTD_RECHECK_SECONDS in the harness): its limits still follow
    the fleet on their own schedule (every RKE2CERTD_LIMITS_SECONDS, here 1 s), `home` (the
    agents it takes as its own, fleet_limits.py) among them, logged."""
    every = {"RKE2CERTD_LIMITS_SECONDS": "1"}
    specs = [NodeSpec("e1", ("etcd",)), NodeSpec("c1", ("control-plane",), env=every)]
    cluster = sim_sqlite(specs)
    fleet = [f"x{i}" for i in range(60)]
    with cluster.open_store() as ds:  # members that never run: only the fleet's size counts
        store = ClusterStore(ds)
        for name in fleet:
            store.ensure_member(Member(name, ("agent",), Phase.AGENT))

    def followed() -> list[dict[str, object]]:
        return [
            e
            for e in cluster.nodes["c1"].log_events("supervisor_limits")
            if str(e["reason"]).startswith("60 agent(s) over 2 server(s)")
        ]

    event = cluster.wait_for(followed, 60, "c1's limits for 60 agents")[0]
    assert event["home"] == fleet_limits(60, 2, 1 << 16).home == 31  # a twentieth over 30


def _agent_port(cluster: SimCluster) -> int:
    import yaml

    doc = yaml.safe_load(cluster.nodes["a1"].config.read_text())
    return int(doc["supervisor-port"])


def _token(cluster: SimCluster, name: str) -> str:
    import yaml

    doc = yaml.safe_load((cluster.nodes[name].dir / "rke2" / "config.yaml").read_text())
    return str(doc["token"])
