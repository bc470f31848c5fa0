"""The coordination keys and their JSON values (versioned, so an older daemon can skip what it
does not understand instead of crashing).

    /rke2certd/members/<node>                    membership, until `rke2certd node remove`
    /rke2certd/nodes/<node>                      registration, on the node's lease (presence)
    /rke2certd/rollouts/<id>                     a rollout record
    /rke2certd/slots/<phase>/<k>                 a restart slot, on the holder's lease
    /rke2certd/status/<id>/<node>                one node's progress in that rollout
    /rke2certd/updates/<node>                    the registration as since updated (same
                                                 record: generation, health, activity), on
                                                 the node's lease
    /rke2certd/wake/<node>                       a wake-up mark for a server node (who wrote
                                                 it, why), on the writer's lease

Everything lives under one prefix so that one range read is a consistent snapshot. Within it,
the keys every node must hear about (membership, a node coming or going, rollout records) form
one range, STRUCTURE (members/ to rollouts/), which changes a few times per rollout; the busy
keys (slots, statuses, registration updates: several writes per node and rollout) sort after
it. A server watches STRUCTURE and its own wake key, nothing else (rollout/link.py): a node
that frees a slot or reports writes the wake keys of the few nodes that may go on now
(plan/rollout.py `to_wake`), so a write reaches O(1) nodes, not all N. That is also why a
registration is written once (presence) and its updates go to another key.

One family lives outside the prefix on purpose:

    /rke2certd-node-passwords/<node>             a hash of the node password an agent
                                                 proved that name with (supervisor/node_auth.py)

Agents may read everything under /rke2certd/ through a server's endpoint; these hashes are for
the servers only, and they are no part of the rollout snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rke2certd.datastore.base import KV, Snapshot
from rke2certd.errors import UsageError
from rke2certd.plan.rollout import (
    ClusterView,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
)

API_VERSION = "rke2certd.io/v1"
PREFIX = "/rke2certd/"
NODES = PREFIX + "nodes/"
MEMBERS = PREFIX + "members/"
ROLLOUTS = PREFIX + "rollouts/"
SLOTS = PREFIX + "slots/"
STATUSES = PREFIX + "status/"
UPDATES = PREFIX + "updates/"
WAKE = PREFIX + "wake/"
NODE_PASSWORDS = "/rke2certd-node-passwords/"  # outside PREFIX: see the module doc
# [STRUCTURE, STRUCTURE_END): members, registrations (presence), rollout records
STRUCTURE = MEMBERS
STRUCTURE_END = ROLLOUTS[:-1] + chr(ord("/") + 1)
# [PLANNING): what the rules read: everything but the registrations' updates and wake keys
PLANNING = (PREFIX, UPDATES)


def check_name(name: str) -> str:
    if not name or "/" in name or len(name) > 253 or name != name.strip():
        raise UsageError(f"{name!r} is not a usable node name (no '/', 1-253 characters)")
    return name


def node_key(name: str) -> str:
    return NODES + check_name(name)


def member_key(name: str) -> str:
    return MEMBERS + check_name(name)


def rollout_key(rollout_id: str) -> str:
    return ROLLOUTS + check_name(rollout_id)


def update_key(name: str) -> str:
    return UPDATES + check_name(name)


def wake_key(name: str) -> str:
    return WAKE + check_name(name)


def node_password_key(name: str) -> str:
    return NODE_PASSWORDS + check_name(name)


def status_key(rollout_id: str, node: str) -> str:
    return f"{STATUSES}{check_name(rollout_id)}/{check_name(node)}"


def status_rollout(key: str) -> str | None:
    """The rollout id of a status key, None if `key` is no status key."""
    if key.startswith(STATUSES):
        parts = key[len(STATUSES) :].split("/")
        return parts[0] if len(parts) == 2 else None
    return None


def slot_key(phase: Phase, index: int) -> str:
    return f"{SLOTS}{phase.value}/{index}"


# -- encoding ------------------------------------------------------------------------------------


def _t(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _pt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def _dump(kind: str, doc: dict[str, Any]) -> bytes:
    return json.dumps({"apiVersion": API_VERSION, "kind": kind, **doc}, sort_keys=True).encode()


def encode_member(m: Member) -> bytes:
    doc = {"name": m.name, "roles": list(m.roles), "phase": m.phase.value}
    return _dump("Member", doc | {"downSince": _t(m.down_since)})


def encode_registration(r: Registration) -> bytes:
    return _dump(
        "Registration",
        {
            "name": r.name,
            "roles": list(r.roles),
            "phase": r.phase.value,
            "version": r.version,
            "caGeneration": r.ca_generation,
            "health": r.health,
            "activity": r.activity,
            "registered": _t(r.registered),
            "updated": _t(r.updated),
        },
    )


def encode_rollout(r: Rollout) -> bytes:
    return _dump(
        "Rollout",
        {
            "id": r.id,
            "type": r.kind.value,
            "caGeneration": r.ca_generation,
            "phases": [p.value for p in r.phases],
            "nodes": list(r.nodes) if r.nodes is not None else None,
            "state": r.state.value,
            "reason": r.reason,
            "created": _t(r.created),
            "createdBy": r.created_by,
            "stateReason": r.state_reason,
            "finished": _t(r.finished),
            "attempt": r.attempt,
        },
    )


def encode_status(s: NodeStatus) -> bytes:
    return _dump(
        "RolloutNodeStatus",
        {
            "node": s.node,
            "state": s.state.value,
            "message": s.message,
            "generation": s.generation,
            "appliedAt": _t(s.applied_at),
            "restartStarted": _t(s.restart_started),
            "finished": _t(s.finished),
            "attempt": s.attempt,
            "restartSeconds": s.restart_seconds,
            "healthSeconds": s.health_seconds,
        },
    )


def encode_wake(by: str, rollout_id: str, at: datetime) -> bytes:
    """Only its change matters to the woken node (it reads everything again); the content says
    who woke it, for whoever looks."""
    return _dump("WakeUp", {"by": by, "rollout": rollout_id, "at": _t(at)})


def encode_slot(s: Slot) -> bytes:
    doc = {"phase": s.phase.value, "index": s.index, "node": s.node, "rollout": s.rollout}
    return _dump("RestartSlot", doc | {"since": _t(s.since)})


# -- decoding ------------------------------------------------------------------------------------


def _load(kv: KV) -> dict[str, Any]:
    doc = json.loads(kv.value)
    if not isinstance(doc, dict) or doc.get("apiVersion") != API_VERSION:
        raise ValueError(f"not an {API_VERSION} record")
    return doc


def decode_member(kv: KV) -> Member:
    d = _load(kv)
    return Member(d["name"], tuple(d["roles"]), Phase(d["phase"]), _pt(d.get("downSince")))


def decode_registration(kv: KV) -> Registration:
    d = _load(kv)
    return Registration(
        d["name"],
        tuple(d["roles"]),
        Phase(d["phase"]),
        d.get("version", ""),
        d.get("caGeneration"),
        d.get("health", "unknown"),
        d.get("activity", ""),
        _pt(d.get("registered")),
        _pt(d.get("updated")),
    )


def decode_rollout(kv: KV) -> Rollout:
    d = _load(kv)
    nodes = d.get("nodes")
    return Rollout(
        id=d["id"],
        kind=RolloutKind(d["type"]),
        ca_generation=d.get("caGeneration") or "",
        phases=tuple(Phase(p) for p in d["phases"]),
        nodes=tuple(nodes) if nodes is not None else None,
        state=RolloutState(d["state"]),
        reason=d.get("reason", ""),
        created=_pt(d.get("created")) or datetime.fromtimestamp(0, UTC),
        created_by=d.get("createdBy", ""),
        revision=kv.create_revision,
        state_reason=d.get("stateReason", ""),
        finished=_pt(d.get("finished")),
        attempt=int(d.get("attempt", 1)),
    )


def decode_status(kv: KV) -> NodeStatus:
    d = _load(kv)
    return NodeStatus(
        d["node"],
        NodeState(d["state"]),
        d.get("message", ""),
        d.get("generation"),
        _pt(d.get("appliedAt")),
        _pt(d.get("restartStarted")),
        _pt(d.get("finished")),
        int(d.get("attempt", 1)),
        d.get("restartSeconds"),
        d.get("healthSeconds"),
        kv.create_revision,
    )


def decode_slot(kv: KV) -> Slot:
    d = _load(kv)
    return Slot(Phase(d["phase"]), int(d["index"]), d["node"], d["rollout"], _pt(d.get("since")))


def slot_holder(kv: KV) -> str | None:
    """The node a slot record names; None when the record cannot be read."""
    try:
        return decode_slot(kv).node
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Parsed:
    """A snapshot of the prefix as a ClusterView, plus the raw keys (for compare-and-swap)."""

    view: ClusterView
    kvs: dict[str, KV]
    revision: int
    problems: list[str] = field(default_factory=list)


Record = Registration | Member | Slot | Rollout | NodeStatus | str  # str: why unreadable


def decode(kv: KV) -> Record | None:
    """One key's record by where it lives (None: not a record this version knows)."""
    try:
        if kv.key.startswith((NODES, UPDATES)):
            return decode_registration(kv)
        if kv.key.startswith(MEMBERS):
            return decode_member(kv)
        if kv.key.startswith(SLOTS):
            return decode_slot(kv)
        if status_rollout(kv.key) is not None:
            return decode_status(kv)
        if kv.key.startswith(ROLLOUTS) and "/" not in kv.key[len(ROLLOUTS) :]:
            return decode_rollout(kv)
    except (ValueError, KeyError, TypeError) as exc:
        return f"{kv.key}: unreadable record ({exc})"
    return None


class Decoded:
    """The records of the last snapshot, by key: a node reads the whole prefix at every
    wake-up, and between two reads only a few keys change, so only those are decoded again (a
    decoded record depends on nothing but its KV). A key's KV is compared with the one decoded
    before (the same object when a mirror kept it: no comparison at all), never hashed: with
    a fleet's keys, hashing every KV at every read cost more than the rest of the parse."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[KV, Record | None, str | None]] = {}

    def records(self, kvs: list[KV]) -> list[tuple[KV, Record | None, str | None]]:
        """Each KV with its record and, for a status, its rollout's id."""
        known = self._records
        fresh: dict[str, tuple[KV, Record | None, str | None]] = {}
        for kv in kvs:
            hit = known.get(kv.key)
            if hit is None or (hit[0] is not kv and hit[0] != kv):
                hit = (kv, decode(kv), status_rollout(kv.key))
            fresh[kv.key] = hit
        self._records = fresh  # only what the store still holds: the cache never grows
        return list(fresh.values())


def parse(snapshot: Snapshot, cache: Decoded | None = None) -> Parsed:
    """Unknown or broken records are reported in `problems` and left out, never fatal: a newer
    rke2certd on another node may write what this one cannot read."""
    members: dict[str, Member] = {}
    live: dict[str, Registration] = {}
    updates: dict[str, Registration] = {}
    rollouts: list[Rollout] = []
    statuses: dict[tuple[str, str], NodeStatus] = {}
    slots: list[Slot] = []
    problems: list[str] = []
    kvs = {kv.key: kv for kv in snapshot.kvs}
    for kv, record, rollout_id in (cache or Decoded()).records(snapshot.kvs):
        if isinstance(record, NodeStatus):
            statuses[(rollout_id or "", record.node)] = record
        elif isinstance(record, Registration):
            (updates if kv.key.startswith(UPDATES) else live)[record.name] = record
        elif isinstance(record, Member):
            members[record.name] = record
        elif isinstance(record, Slot):
            slots.append(record)
        elif isinstance(record, Rollout):
            rollouts.append(record)
        elif isinstance(record, str):
            problems.append(record)
    for name, update in updates.items():
        if name in live:  # without its registration, a node is gone (node remove --force)
            live[name] = update
    rollouts.sort(key=lambda r: r.revision)
    view = ClusterView(members, live, tuple(rollouts), statuses, tuple(slots))
    return Parsed(view, kvs, snapshot.revision, problems)
