"""`rke2certd status --exit-codes=nagios`: this node's certificates and the cluster's rollouts
as a monitoring plugin reports them: a first line `RKE2CERTD <LEVEL> - <what>`, the usual
output after it, and the exit code of the worst of both (0 OK, 1 warning, 2 critical,
3 unknown)."""

from __future__ import annotations

import json
import sys

from rke2certd.clock import system_clock
from rke2certd.config import Config
from rke2certd.errors import Rke2certdError
from rke2certd.node.node import Node
from rke2certd.plan.verdict import Level, Verdict, verdict


def cluster_verdict(doc: dict[str, object]) -> Verdict:
    """PURE: a stopped rollout is critical; an active one, or a member node down, a warning."""
    rollouts = doc.get("rollouts") or []
    nodes = doc.get("nodes") or []
    assert isinstance(rollouts, list) and isinstance(nodes, list)
    if rollouts and rollouts[0].get("state") == "stopped":
        r = rollouts[0]
        return Verdict(Level.CRITICAL, f"rollout {r['id']} stopped: {r.get('stateReason')}")
    down = [n["name"] for n in nodes if n.get("member") and not n.get("live")]
    active = [r["id"] for r in rollouts if r.get("state") == "active"]
    parts = []
    if active:
        parts.append(f"rollout {active[0]} in progress")
    if down:
        parts.append(f"node(s) down: {', '.join(down)}")
    if parts:
        return Verdict(Level.WARNING, "; ".join(parts))
    return Verdict(Level.OK, f"{len(nodes)} node(s), no rollout in progress")


def status_plugin(cfg: Config, output: str) -> int:
    from rke2certd.commands.check import check
    from rke2certd.commands.status import render_table

    node = Node.from_config(cfg)
    try:
        result = check(node, [], system_clock())
        certs = verdict(result.rows, result.errors, result.warnings, result.kubeconfigs)
        doc = _cluster_doc(cfg, node)
    except Rke2certdError as exc:
        print(f"RKE2CERTD UNKNOWN - {str(exc).splitlines()[0]}")
        return int(Level.UNKNOWN)
    cluster = cluster_verdict(doc)
    level = max(certs.level, cluster.level, key=_severity)
    print(f"RKE2CERTD {level.name} - certificates: {certs.text}; cluster: {cluster.text}")
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if output == "json" else render_table(doc))
    return int(level)


def _severity(level: Level) -> int:
    return [Level.OK, Level.WARNING, Level.UNKNOWN, Level.CRITICAL].index(level)


def _cluster_doc(cfg: Config, node: Node) -> dict[str, object]:
    from rke2certd.commands.status import status_doc
    from rke2certd.rollout.cluster_store import ClusterStore

    if not cfg.is_server:
        from rke2certd.commands.agent import agent_token
        from rke2certd.commands.agent_rollout import remote_store

        return status_doc(
            ClusterStore(remote_store(node, lambda: agent_token(node))).read(everything=True)
        )
    from rke2certd.commands.node_datastore import open_for

    with open_for(node) as ds:
        return status_doc(ClusterStore(ds).read(everything=True))
