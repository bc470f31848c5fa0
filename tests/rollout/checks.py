"""Assertions on a simulated cluster after (or during) a rollout, from the restart records and
the datastore."""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from rke2certd.node.ca_material import disk_generation
from rke2certd.pki import build, certs, keys
from rke2certd.plan.rollout import ClusterView, NodeStatus, Phase, phase_of
from rke2certd.rollout.cluster_store import ClusterStore
from tests.harness.cluster import SimCluster


def view(cluster: SimCluster) -> ClusterView:
    with cluster.open_store() as ds:
        return ClusterStore(ds).read(everything=True).view


def only_rollout(cluster: SimCluster) -> dict[str, Any] | None:
    doc = cluster.status()
    return doc["rollouts"][0] if doc["rollouts"] else None


def wait_rollout(cluster: SimCluster, state: str, timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        r = only_rollout(cluster)
        return r if r is not None and r["state"] == state else None

    result: dict[str, Any] = cluster.wait_for(check, timeout, f"a rollout {state}", poll=0.5)
    return result


def phases(cluster: SimCluster) -> dict[str, Phase]:
    return {name: phase_of(node.spec.roles) for name, node in cluster.nodes.items()}


def statuses(cluster: SimCluster, rollout_id: str) -> dict[str, NodeStatus]:
    v = view(cluster)
    return {node: st for (rid, node), st in v.statuses.items() if rid == rollout_id}


def assert_order(cluster: SimCluster, rollout_id: str, removed: tuple[str, ...] = ()) -> None:
    """No node restarts before every node of the earlier phases reported done; never two nodes
    of one phase restarting at once (a restart lasts from its record to its done report).
    `removed` nodes left the cluster by `node remove`: nobody waits for them any more."""
    sts = statuses(cluster, rollout_id)
    phase_of_node = phases(cluster)
    done_at: dict[Phase, list[float]] = defaultdict(list)
    for node, st in sts.items():
        if st.finished is not None:
            done_at[phase_of_node[node]].append(st.finished.timestamp())
    begins = cluster.restarts(rollout_id)
    order = list(Phase)
    for rec in begins:
        mine = phase_of_node[rec["node"]]
        for earlier in order[: order.index(mine)]:
            for t in done_at[earlier]:
                assert rec["t"] > t, (
                    f"{rec['node']} ({mine}) began its restart at {rec['t']:.3f}, before an "
                    f"{earlier} node reported done at {t:.3f}"
                )
    by_phase: dict[Phase, list[tuple[float, float, str]]] = defaultdict(list)
    for node, spans in _spans(cluster, rollout_id, sts).items():
        if node in removed:
            continue
        by_phase[phase_of_node[node]] += [(b, e, node) for b, e in spans]
    for phase, spans in by_phase.items():
        spans.sort()
        for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
            assert begin >= end, f"{a} and {b} ({phase}) restarted at the same time"


def _spans(
    cluster: SimCluster, rollout_id: str, sts: dict[str, NodeStatus]
) -> dict[str, list[tuple[float, float]]]:
    """Each node's restarts as (begin, end): the last one ends with its done report; an earlier
    attempt (its daemon died during it) ends with its restart script."""
    records = [r for r in cluster.records() if r["rollout"] == rollout_id]
    out: dict[str, list[tuple[float, float]]] = {}
    for node in {r["node"] for r in records}:
        mine = [r for r in records if r["node"] == node]
        begins = [r["t"] for r in mine if r["event"] == "restart_begin"]
        ends = [r["t"] for r in mine if r["event"] == "restart_end"]
        spans = []
        for i, b in enumerate(begins):
            if i == len(begins) - 1:
                st = sts.get(node)
                end = st.finished.timestamp() if st is not None and st.finished else float("inf")
            else:
                end = min([t for t in ends if t > b] + [begins[i + 1]])
            spans.append((b, end))
        out[node] = spans
    return out


def assert_all_on(cluster: SimCluster, generation: str, nodes: list[str] | None = None) -> None:
    for name in nodes or list(cluster.nodes):
        node = cluster.nodes[name]
        assert disk_generation(node.layout) == generation, f"{name} is not on {generation}"
    live = view(cluster).live
    for name in nodes or list(cluster.nodes):
        if name in live:
            assert live[name].ca_generation == generation, f"{name} registered another generation"


def age_leaf(cluster: SimCluster, node: str, leaf: str, ca: str, days: int) -> None:
    """Re-sign `<tls>/<leaf>.crt` (same key, names and CA) to expire in `days` days, so that
    the node's next renew replaces it: a renewal RKE2 must be restarted for."""
    tls = cluster.nodes[node].layout.tls
    cert_path, key_path = tls / f"{leaf}.crt", tls / f"{leaf}.key"
    old = certs.load_bundle(cert_path.read_bytes(), cert_path)[0]
    ca_bundle = (tls / f"{ca}.crt").read_bytes()
    ca_cert = certs.load_bundle(ca_bundle, ca)[0]
    ca_key = keys.load_key((tls / f"{ca}.key").read_bytes(), ca)
    key = keys.load_key(key_path.read_bytes(), key_path)
    san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    cn = old.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    new = build.leaf(
        str(cn), (), "server", names, key.public_key(), ca_cert, ca_key, datetime.now(UTC), days
    )
    staged = cert_path.with_name(f".{cert_path.name}.new")
    staged.write_bytes(certs.bundle_pem([new]) + ca_bundle)
    staged.chmod(0o644)
    os.replace(staged, cert_path)  # one rename: the daemon never reads half a file
