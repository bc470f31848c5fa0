"""The agent phase of a rollout, on the simulated cluster of the ordering tests (a three-member
TLS etcd, three etcd nodes, two control-plane nodes, one etcd + control-plane node) plus three
agent-only `rke2certd run` processes. The agents hold no datastore credentials: they take part
through c1's endpoint, pinned by the full agent token in their RKE2 config.yaml.

A cross-signed CA set staged on e1 must end with: no agent restarted before every server was
done, agents one at a time, every agent on certs from the NEW CA, its token rewritten to the
new CA hash (the rest of its config.yaml kept), and real TLS between an agent's client-kubelet
and a server's restarted apiserver stand-in."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml

from rke2certd.pki import certs
from rke2certd.pki.join_token import ca_hash, parse_token
from tests.harness.cluster import NodeSpec, SimCluster
from tests.harness.wait import SAFETY

from .checks import assert_order, statuses, view, wait_rollout
from .conftest import ClusterFactory, standard_specs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # simulated clusters

AGENTS = ("a1", "a2", "a3")


def _specs() -> list[NodeSpec]:
    return standard_specs() + [NodeSpec(name, ("agent",)) for name in AGENTS]


def _openssl_verify(root: Path, untrusted: Path, leaf: Path) -> None:
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(untrusted), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and ": OK" in res.stdout, res.stdout + res.stderr


def _split_new_ca(bundle_path: Path, out: Path) -> tuple[Path, Path]:
    """A rotated bundle is: new intermediate, new root cross-signed by the old CA, new
    self-signed root, then the old CA certs. The new root alone is the trust anchor here."""
    chain = certs.load_bundle(bundle_path.read_bytes(), bundle_path)
    inter, root = out / f"{bundle_path.stem}-inter.pem", out / f"{bundle_path.stem}-root.pem"
    inter.write_bytes(certs.bundle_pem([chain[0]]))
    root.write_bytes(certs.bundle_pem([chain[2]]))
    assert chain[2].issuer == chain[2].subject  # self-signed
    return root, inter


@pytest.mark.etcd
def test_agents_restart_last_on_new_certs_and_token(
    sim_etcd: ClusterFactory, tmp_path: Path
) -> None:
    _rotate_with_agents(sim_etcd(_specs()), tmp_path)


def test_agents_restart_last_on_sqlite(sim_sqlite: ClusterFactory, tmp_path: Path) -> None:
    """All on one machine with the SQLite default: the agents' watch goes through the
    endpoint to the servers' SQLite watch."""
    _rotate_with_agents(sim_sqlite(_specs()), tmp_path)


def _rotate_with_agents(cluster: SimCluster, tmp_path: Path) -> None:
    old_tokens = {a: _config_token(cluster, a) for a in AGENTS}
    old_hash = {parse_token(t).ca_hash for t in old_tokens.values()}
    assert len(old_hash) == 1 and None not in old_hash
    # the agents registered through the endpoint, in the agent phase
    cluster.wait_for(lambda: set(AGENTS) <= set(view(cluster).live), 30, "agents registered")
    assert {view(cluster).members[a].phase.value for a in AGENTS} == {"agent"}

    # a server joined with the full server token in its config (it pins the CA hash too)
    c2 = cluster.nodes["c2"]
    full = (c2.data / "server" / "token").read_text().strip()
    doc = yaml.safe_load(c2.config.read_text())
    c2.config.write_text(yaml.safe_dump({**doc, "token": full}, sort_keys=False))
    cluster.signal_node("c2", signal.SIGHUP)
    cluster.wait_for(lambda: c2.log_events("reloading"), 10, "c2 reloaded")

    cluster.stage_rotation("e1")
    r = wait_rollout(cluster, "done", timeout=180)
    rid = r["id"]
    assert r["phases"] == ["etcd", "control-plane", "agent"]
    assert {n["name"]: n["state"] for n in r["nodes"]} == dict.fromkeys(cluster.nodes, "done")

    # order: every server done before the first agent restart; agents one at a time
    assert_order(cluster, rid)
    sts = statuses(cluster, rid)
    servers_done = max(
        st.finished.timestamp() for n, st in sts.items() if n not in AGENTS and st.finished
    )
    agent_restarts = [x for x in cluster.restarts(rid) if x["node"] in AGENTS]
    assert sorted(x["node"] for x in agent_restarts) == sorted(AGENTS)
    assert min(x["t"] for x in agent_restarts) > servers_done
    assert {x["phase"] for x in agent_restarts} == {"agent"}

    # every agent on the new generation, as the datastore and its disk say
    live = view(cluster).live
    assert {live[a].ca_generation for a in AGENTS} == {r["caGeneration"]}

    server_tls = cluster.nodes["c1"].layout.tls
    new_hash = ca_hash((server_tls / "server-ca.crt").read_bytes())
    assert new_hash not in old_hash
    server_root, server_inter = _split_new_ca(server_tls / "server-ca.crt", tmp_path)
    client_root, client_inter = _split_new_ca(server_tls / "client-ca.crt", tmp_path)
    for a in AGENTS:
        agent = cluster.nodes[a].layout.agent
        # certs from the NEW CAs (trusting only the new roots)
        _openssl_verify(client_root, client_inter, agent / "client-kubelet.crt")
        _openssl_verify(client_root, client_inter, agent / "client-kube-proxy.crt")
        _openssl_verify(server_root, server_inter, agent / "serving-kubelet.crt")
        # the token: same credentials, new hash; the rest of the file kept
        token = _config_token(cluster, a)
        assert parse_token(token).ca_hash == new_hash
        assert token == old_tokens[a].replace(next(iter(old_hash)) or "", new_hash)
        text = (cluster.nodes[a].dir / "rke2" / "config.yaml").read_text()
        assert (
            text.startswith("# RKE2 agent configuration") and "# the cluster's agent token" in text
        )
        assert "node-label:\n  - sim=agent\n" in text
        assert (cluster.nodes[a].dir / "rke2" / "config.yaml").stat().st_mode & 0o777 == 0o600
        [adopted] = cluster.nodes[a].log_events("ca_adopted")
        assert adopted["ca_hash"] == new_hash

    c2_token = str(yaml.safe_load(c2.config.read_text())["token"])
    assert c2_token == full.replace(next(iter(old_hash)) or "", new_hash)

    # an agent sees the rollout through the endpoint too
    table = cluster.cli("a2", "status")
    assert table.returncode == 0, table.stderr
    assert f"{rid}  ca  done" in table.stdout and "a3" in table.stdout

    # real TLS: a1's client-kubelet against c1's restarted apiserver stand-in (client auth
    # required against the server's client-ca.crt), verifying the server by a1's server CA
    a1 = cluster.nodes["a1"].layout.agent
    ctx = ssl.create_default_context(cafile=str(a1 / "server-ca.crt"))
    ctx.load_cert_chain(str(a1 / "client-kubelet.crt"), str(a1 / "client-kubelet.key"))
    port = cluster.nodes["c1"].ports["apiserver"]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        assert b" 200 " in tls.recv(4096).split(b"\r\n")[0] + b" "
        assert tls.getpeercert() is not None


def _config_token(cluster: SimCluster, name: str) -> str:
    doc = yaml.safe_load((cluster.nodes[name].dir / "rke2" / "config.yaml").read_text())
    return str(doc["token"])
