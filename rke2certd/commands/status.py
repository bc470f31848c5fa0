"""`rke2certd status`, `rke2certd node remove`, `rke2certd rollout resume`: the cluster's
rollouts and nodes as the datastore holds them, and the two operator actions on them."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rke2certd.datastore.base import Datastore
from rke2certd.errors import UsageError
from rke2certd.log import log
from rke2certd.plan.rollout import (
    Availability,
    Blocked,
    ClusterView,
    Rollout,
    RolloutState,
    blocked,
    current_phase,
    node_rows,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import NODE_HISTORY, ClusterStore


def _t(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _short(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _nodes(view: ClusterView) -> list[dict[str, Any]]:
    out = []
    for name in sorted(set(view.members) | set(view.live)):
        m, reg = view.members.get(name), view.live.get(name)
        roles = reg.roles if reg else m.roles if m else ()
        phase = reg.phase if reg else m.phase if m else None
        out.append(
            {
                "name": name,
                "roles": list(roles),
                "phase": phase.value if phase else None,
                "member": m is not None,
                "live": reg is not None,
                "downSince": _t(m.down_since) if m and reg is None else None,
                "caGeneration": reg.ca_generation if reg else None,
                "health": reg.health if reg else None,
                "version": reg.version if reg else None,
                "activity": reg.activity if reg else None,
            }
        )
    return out


def _rollout(view: ClusterView, r: Rollout, stuck: list[Blocked]) -> dict[str, Any]:
    phase = current_phase(view, r) if r.active else None
    # older finished rollouts keep their record, not their per-node statuses (store.collect)
    kept = r.active or r.state is RolloutState.STOPPED or any(k[0] == r.id for k in view.statuses)
    return {
        "id": r.id,
        "type": r.kind.value,
        "caGeneration": r.ca_generation,
        "state": r.state.value,
        "stateReason": r.state_reason,
        "phase": phase.value if phase else None,
        "phases": [p.value for p in r.phases],
        "reason": r.reason,
        "created": _t(r.created),
        "createdBy": r.created_by,
        "finished": _t(r.finished),
        "attempt": r.attempt,
        "nodes": [
            {
                "name": row.name,
                "phase": row.phase.value,
                "live": row.live,
                "caGeneration": row.generation,
                "state": row.state,
                "message": row.message,
            }
            for row in (node_rows(view, r) if kept else [])
        ],
        "nodesKept": kept,
        "blocked": [
            {
                "node": b.member.name,
                "phase": b.member.phase.value,
                "since": _t(b.since),
                "action": "skip" if b.skip else "wait",
                "reason": b.reason,
            }
            for b in stuck
            if b.rollout.id == r.id
        ],
    }


def status_doc(
    parsed: rec.Parsed, now: datetime | None = None, policy: Availability | None = None
) -> dict[str, Any]:
    """`now` and `policy`: to say which members block a rollout (none without `now`)."""
    view = parsed.view
    stuck = blocked(view, now, policy or Availability()) if now is not None else []
    return {
        "apiVersion": rec.API_VERSION,
        "kind": "ClusterStatus",
        "revision": parsed.revision,
        "nodes": _nodes(view),
        "rollouts": [_rollout(view, r, stuck) for r in reversed(view.rollouts)],  # newest first
        "slots": [
            {"phase": s.phase.value, "index": s.index, "node": s.node, "rollout": s.rollout}
            for s in view.slots
        ],
        "problems": parsed.problems,
    }


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    return [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render_table(doc: dict[str, Any]) -> str:
    lines = [f"DATASTORE: {doc['datastore']}", ""] if doc.get("datastore") else []
    lines.append("NODES")
    rows = []
    for n in doc["nodes"]:
        since = datetime.fromisoformat(n["downSince"]) if n["downSince"] else None
        state = "live" if n["live"] else f"down since {_short(since)}"
        if not n["member"]:
            state += " (not a member)"
        rows.append(
            [n["name"], n["phase"] or "-", state, n["caGeneration"] or "-", n["health"] or "-"]
        )
    lines += _table(["NAME", "PHASE", "STATE", "CA GENERATION", "HEALTH"], rows)
    lines.append("")
    lines.append("ROLLOUTS" if doc["rollouts"] else "ROLLOUTS: none")
    for r in doc["rollouts"]:
        state = r["state"] + (f" in phase {r['phase']}" if r["phase"] else "")
        created = _short(datetime.fromisoformat(r["created"])) if r["created"] else "-"
        lines.append(f"{r['id']}  {r['type']}  {state}  created {created} by {r['createdBy']}")
        lines.append(f"  reason: {r['reason']}")
        if r["stateReason"]:
            lines.append(f"  {r['state']}: {r['stateReason']}")
        for b in r.get("blocked", []):
            lines.append(f"  BLOCKED by {b['node']}: {b['reason']}")
        rows = [
            [
                n["name"],
                n["phase"],
                "live" if n["live"] else "down",
                n["caGeneration"] or "-",
                n["state"],
                n["message"],
            ]
            for n in r["nodes"]
        ]
        header = ["NODE", "PHASE", "DAEMON", "CA GENERATION", "STATE", "MESSAGE"]
        if r.get("nodesKept", True):
            lines += _table(header, rows, "  ")
        else:
            lines.append(
                f"  (per-node states are kept for the newest {NODE_HISTORY} finished rollouts)"
            )
    for p in doc["problems"]:
        lines.append(f"warning: {p}")
    return "\n".join(lines) + "\n"


def render_status(
    ds: Datastore,
    output: str,
    now: datetime | None = None,
    policy: Availability | None = None,
    datastore: str | None = None,
) -> str:
    """`datastore` says which store this node uses (RKE2's, or the standalone SQLite file)."""
    doc = status_doc(ClusterStore(ds).read(everything=True), now, policy)
    if datastore:
        doc = {"datastore": datastore, **doc}
    if output == "json":
        return json.dumps(doc, indent=2) + "\n"
    return render_table(doc)


def remove_node(ds: Datastore, name: str, *, force: bool) -> str:
    """Take a node out of the registry: rollouts stop waiting for it. A running node is
    refused (it would register again at once) unless `force`, for a node known to be gone
    whose lease has not run out yet; its lease is revoked, freeing any restart slot."""
    store = ClusterStore(ds)
    parsed = store.read()
    reg = parsed.kvs.get(rec.node_key(name))
    if name not in parsed.view.members and reg is None:
        raise UsageError(f"no node {name} in the registry; `rke2certd status` lists them")
    if reg is not None and not force:
        raise UsageError(
            f"node {name} is running (its rke2certd is registered); stop rke2certd there "
            "first (it drops out registry-ttl seconds after it stops), or use --force if the "
            "node is gone for good"
        )
    if reg is not None:
        if reg.lease:
            ds.revoke_lease(reg.lease)
        ds.delete(rec.node_key(name))
    store.remove_member(name)
    ds.delete(rec.node_password_key(name))  # the name is free again, for a new node password
    log.info("node_removed", node=name, reason="rke2certd node remove", force=force)
    return f"removed node {name} from the registry; rollouts no longer wait for it\n"


def resume_rollout(ds: Datastore, rollout_id: str) -> str:
    store = ClusterStore(ds)
    r = store.read().view.rollout(rollout_id)
    if r is None:
        raise UsageError(f"no rollout {rollout_id}; `rke2certd status` lists them")
    if r.state.value != "stopped" or not store.resume(rollout_id):
        raise UsageError(f"rollout {rollout_id} is {r.state.value}; only a stopped one resumes")
    log.info("rollout_resumed", rollout_id=rollout_id, reason=f"attempt {r.attempt + 1}")
    return (
        f"rollout {rollout_id} is active again (attempt {r.attempt + 1}); the nodes that failed "
        "or stopped start over, in order\n"
    )
