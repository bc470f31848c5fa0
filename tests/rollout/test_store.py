"""The coordination keys on a real store (the embedded SQLite file, with an injected clock for
lease expiry): create-if-absent rollouts, superseding, lease-bound slots, CAS state changes,
`resume`, membership, records that cannot be read, and the `status`/`node remove` commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.commands.status import (
    remove_node,
    render_status,
    render_table,
    resume_rollout,
    status_doc,
)
from rke2certd.datastore import SQLiteDatastore
from rke2certd.errors import UsageError
from rke2certd.plan.rollout import (
    PHASES,
    SERVER_PHASES,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    RolloutKind,
    RolloutState,
    Slot,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import NODE_HISTORY, ClusterStore
from rke2certd.rollout.create import ca_rollout, renewal_rollout, restart_phases, start
from tests.conftest import FrozenClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(T0)


@pytest.fixture
def ds(tmp_path: Path, clock: FrozenClock) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "db.sqlite", clock=clock, poll_interval=0.01) as store:
        yield store


def test_restart_phases() -> None:
    assert restart_phases(None) == PHASES
    assert restart_phases(["tls/service.key"]) == SERVER_PHASES
    assert restart_phases(["tls/etcd/peer-ca.crt", "tls/etcd/peer-ca.key"]) == SERVER_PHASES
    assert restart_phases(["tls/request-header-ca.crt", "tls/service.key"]) == SERVER_PHASES
    assert restart_phases(["tls/client-ca.crt", "tls/service.key"]) == PHASES
    assert restart_phases(["tls/server-ca.key"]) == PHASES


def test_ca_rollout_is_created_once(ds: SQLiteDatastore) -> None:
    first, created = start(ds, ca_rollout("g1", ["tls/service.key"], "e1", "why", T0), T0)
    again, created_again = start(ds, ca_rollout("g1", [], "e2", "other", T0), T0)
    assert (created, created_again) == (True, False)
    assert again == first and first.created_by == "e1" and first.phases == SERVER_PHASES
    assert first.revision > 0
    ds.create(rec.rollout_key("ca-g9"), b"{a newer daemon's record")
    asked = ca_rollout("g9", [], "e2", "why", T0)
    assert start(ds, asked, T0) == (asked, False)  # left alone; `read()` reports it


def test_new_ca_generation_supersedes_the_active_one(ds: SQLiteDatastore) -> None:
    store = ClusterStore(ds)
    old, _ = start(ds, ca_rollout("g1", [], "e1", "first", T0), T0)
    renewal, _ = start(ds, renewal_rollout("c1", Phase.CONTROL_PLANE, "g1", "renewed", T0), T0)
    new, _ = start(ds, ca_rollout("g2", [], "e1", "second", T0), T0)
    view = store.read().view
    assert [r.id for r in view.rollouts] == [old.id, renewal.id, new.id]
    states = {r.id: (r.state, r.state_reason) for r in view.rollouts}
    assert states[old.id] == (RolloutState.SUPERSEDED, "superseded by ca-g2")
    assert states[renewal.id][0] is RolloutState.ACTIVE
    assert states[new.id][0] is RolloutState.ACTIVE


def test_slots_are_exclusive_and_die_with_the_lease(
    ds: SQLiteDatastore, clock: FrozenClock
) -> None:
    store = ClusterStore(ds)
    a, b = ds.grant_lease(5), ds.grant_lease(60)
    assert store.take_slot(Slot(Phase.ETCD, 0, "e1", "ca-g1", T0), a)
    assert not store.take_slot(Slot(Phase.ETCD, 0, "e2", "ca-g1", T0), b)
    assert not store.release_slot(Slot(Phase.ETCD, 0, "e2", "ca-g1"))  # not e2's to free
    assert [s.node for s in store.read().view.slots] == ["e1"]
    clock.advance(seconds=6)  # e1 died during its restart: its lease ran out
    assert store.read().view.slots == ()
    assert store.take_slot(Slot(Phase.ETCD, 0, "e2", "ca-g1", T0), b)
    assert store.release_slot(Slot(Phase.ETCD, 0, "e2", "ca-g1"))


def test_finish_only_from_active(ds: SQLiteDatastore) -> None:
    store = ClusterStore(ds)
    r, _ = start(ds, ca_rollout("g1", [], "e1", "why", T0), T0)
    assert store.finish(r.id, RolloutState.DONE, "all done", T0)
    assert not store.finish(r.id, RolloutState.STOPPED, "late failure", T0)
    stored = store.read().view.rollout(r.id)
    assert stored is not None and stored.state is RolloutState.DONE and stored.finished == T0


def test_resume_starts_another_attempt(ds: SQLiteDatastore) -> None:
    store = ClusterStore(ds)
    r, _ = start(ds, ca_rollout("g1", [], "e1", "why", T0), T0)
    store.set_status(r, NodeStatus("e1", NodeState.FAILED, "gate"))
    with pytest.raises(UsageError, match="only a stopped one"):
        resume_rollout(ds, r.id)
    store.finish(r.id, RolloutState.STOPPED, "e1 failed", T0)
    assert "attempt 2" in resume_rollout(ds, r.id)
    view = store.read().view
    again = view.rollout(r.id)
    assert again is not None and again.active and again.attempt == 2
    assert view.status(again, "e1") is None  # the old failure no longer counts
    with pytest.raises(UsageError, match="no rollout"):
        resume_rollout(ds, "ca-nope")


def test_membership_and_down_marks(ds: SQLiteDatastore) -> None:
    store = ClusterStore(ds)
    m = Member("c1", ("control-plane",), Phase.CONTROL_PLANE)
    assert store.ensure_member(m)
    assert not store.ensure_member(m)  # unchanged: no write
    assert store.mark_down("c1", T0)
    assert not store.mark_down("c1", T0 + timedelta(hours=1))  # the first time is kept
    assert store.read().view.members["c1"].down_since == T0
    assert store.ensure_member(m)  # back: not down any more
    assert store.read().view.members["c1"].down_since is None
    assert not store.mark_down("ghost", T0)


def test_unreadable_records_are_reported_not_fatal(ds: SQLiteDatastore) -> None:
    ds.create(rec.ROLLOUTS + "ca-bad", b"{not json")
    ds.create(rec.MEMBERS + "x", json.dumps({"apiVersion": "other/v9"}).encode())
    start(ds, ca_rollout("g1", [], "e1", "why", T0), T0)
    parsed = ClusterStore(ds).read()
    assert [r.id for r in parsed.view.rollouts] == ["ca-g1"]
    assert len(parsed.problems) == 2 and "ca-bad" in parsed.problems[1]


def test_a_store_read_again_decodes_only_what_changed_and_sees_every_change(
    ds: SQLiteDatastore,
) -> None:
    store = ClusterStore(ds)
    start(ds, ca_rollout("g1", [], "e1", "why", T0), T0)
    store.ensure_member(Member("c1", ("control-plane",), Phase.CONTROL_PLANE))
    ds.create(rec.MEMBERS + "x", b"{not json")
    r = store.read().view.rollouts[0]
    store.set_status(r, NodeStatus("c1", NodeState.APPLIED))
    first = store.read()
    again = store.read()
    assert again.view == first.view and again.problems == first.problems  # from the cache
    assert again.view.statuses[(r.id, "c1")] is first.view.statuses[(r.id, "c1")]
    assert len(again.problems) == 1 and "members/x" in again.problems[0]  # every read says so

    store.set_status(r, NodeStatus("c1", NodeState.DONE))  # same key, new value
    ds.delete(rec.MEMBERS + "x")
    later = store.read()
    assert later.view.statuses[(r.id, "c1")].state is NodeState.DONE
    assert later.problems == []
    fresh = rec.parse(ds.snapshot(rec.PREFIX))  # without a cache: the same
    assert fresh.view == later.view and fresh.kvs == later.kvs


def test_records_round_trip() -> None:
    r = ca_rollout("g1", ["tls/server-ca.crt"], "e1", "why", T0)
    kv = _kv(rec.rollout_key(r.id), rec.encode_rollout(r), 7)
    assert rec.decode_rollout(kv) == r.__class__(**{**r.__dict__, "revision": 7})
    st = NodeStatus("e1", NodeState.DONE, "ok", "g1", T0, T0, T0, 3, 1.5, 0.25, revision=9)
    assert rec.decode_status(_kv("k", rec.encode_status(st), 9)) == st
    reg = Registration("e1", ("etcd",), Phase.ETCD, "1", "g1", "ok", "idle", T0, T0)
    assert rec.decode_registration(_kv("k", rec.encode_registration(reg))) == reg
    with pytest.raises(UsageError):
        rec.node_key("a/b")


def _kv(key: str, value: bytes, revision: int = 1) -> rec.KV:
    return rec.KV(key, value, revision, revision)


def test_status_and_node_remove(ds: SQLiteDatastore, clock: FrozenClock) -> None:
    store = ClusterStore(ds)
    lease = ds.grant_lease(5)
    for name, phase in (("e1", Phase.ETCD), ("c1", Phase.CONTROL_PLANE)):
        store.ensure_member(Member(name, (phase.value,), phase))
    store.register(Registration("e1", ("etcd",), Phase.ETCD, "0.1", "g1", "ok", "idle"), lease)
    r, _ = start(ds, ca_rollout("g1", [], "e1", "staged set s applied", T0), T0)
    store.set_status(r, NodeStatus("e1", NodeState.DONE, "restart 1.0s", "g1"))
    store.mark_down("c1", T0)

    doc = json.loads(render_status(ds, "json"))
    assert doc["kind"] == "ClusterStatus"
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["e1"]["live"] and nodes["e1"]["caGeneration"] == "g1"
    assert not nodes["c1"]["live"] and nodes["c1"]["downSince"] == T0.isoformat()
    [ro] = doc["rollouts"]
    assert (ro["id"], ro["state"], ro["phase"]) == ("ca-g1", "active", "control-plane")
    rows = {n["name"]: n for n in ro["nodes"]}
    assert rows["e1"]["state"] == "done"
    assert "not running since 2030-01-01 00:00:00 UTC" in rows["c1"]["message"]
    table = render_status(ds, "table")
    assert "ca-g1  ca  active in phase control-plane" in table
    assert "rke2certd node remove c1" in table

    with pytest.raises(UsageError, match="is running"):
        remove_node(ds, "e1", force=False)
    with pytest.raises(UsageError, match="no node ghost"):
        remove_node(ds, "ghost", force=False)
    assert "removed node c1" in remove_node(ds, "c1", force=False)
    assert "removed node e1" in remove_node(ds, "e1", force=True)
    view = store.read().view
    assert view.members == {} and view.live == {}
    assert ClusterStore(ds).read().view.rollouts[0].kind is RolloutKind.CA


def test_busy_keys_sort_apart_from_the_structural_range() -> None:
    # every node watches [STRUCTURE, STRUCTURE_END); the busy keys must fall outside it
    def inside(key: str) -> bool:
        return rec.STRUCTURE <= key < rec.STRUCTURE_END

    assert all(
        inside(k) for k in (rec.member_key("zz"), rec.node_key("a"), rec.rollout_key("ca-1"))
    )
    busy = (rec.status_key("ca-1", "a"), rec.update_key("a"), rec.slot_key(Phase.ETCD, 0))
    assert not any(inside(k) for k in busy)


def test_registration_updates_override_it_while_it_lives(ds: SQLiteDatastore) -> None:
    store, lease = ClusterStore(ds), ds.grant_lease(5)
    reg = Registration("e1", ("etcd",), Phase.ETCD, "1", "g1", "unknown", "starting", T0, T0)
    store.register(reg, lease)
    assert store.read(everything=True).view.live["e1"] == reg
    later = Registration("e1", ("etcd",), Phase.ETCD, "1", "g2", "ok", "idle", T0, T0)
    store.report(later, lease)
    assert ds.get(rec.node_key("e1")).value == rec.encode_registration(reg)  # type: ignore[union-attr]
    assert store.read(everything=True).view.live["e1"] == later
    # the rules' read needs only who is live: the updates (and wake keys) are left out
    store.wake("e1", rec.encode_wake("e2", "ca-1", T0), lease)
    planning = store.read()
    assert planning.view.live["e1"] == reg
    assert rec.update_key("e1") not in planning.kvs and rec.wake_key("e1") not in planning.kvs
    store.register(reg, lease)  # registering again drops the old updates
    assert ds.get(rec.update_key("e1")) is None
    assert store.read(everything=True).view.live["e1"] == reg
    store.report(later, lease)
    ds.delete(rec.node_key("e1"))  # node remove --force: gone, whatever its updates say
    assert "e1" not in store.read(everything=True).view.live
    assert "e1" not in store.read().view.live


def test_a_slot_reread_sees_the_slots_now_and_keeps_the_rest(ds: SQLiteDatastore) -> None:
    """A node that just took a slot checks the limit on the slots read again, not on a whole
    read of the prefix."""
    store = ClusterStore(ds)
    r, _ = start(ds, ca_rollout("g1", [], "e1", "why", T0), T0)
    before = store.read()
    store.take_slot(Slot(Phase.ETCD, 0, "e1", r.id, T0), ds.grant_lease(5))
    store.take_slot(Slot(Phase.ETCD, 1, "e2", r.id, T0), ds.grant_lease(5))
    ds.create(rec.status_key(r.id, "e3"), rec.encode_status(NodeStatus("e3", NodeState.DONE)))
    after = store.reread_slots(before)
    assert sorted(s.node for s in after.view.slots) == ["e1", "e2"]
    assert rec.slot_key(Phase.ETCD, 1) in after.kvs
    assert after.view.statuses == before.view.statuses  # only the slots were read again
    assert after.revision == before.revision and after.view.rollouts == before.view.rollouts


def test_older_finished_rollouts_keep_their_record_not_their_node_statuses(
    ds: SQLiteDatastore,
) -> None:
    """Every node reads every status key at every wake-up: a done or superseded rollout's are
    kept for the newest NODE_HISTORY of them only; a stopped one keeps them (resume needs them)."""
    store = ClusterStore(ds)
    ids = []
    for i in range(6):
        r, _ = start(ds, ca_rollout(f"g{i}", [], "e1", "why", T0), T0)
        for n in ("e1", "c1"):
            store.set_status(r, NodeStatus(n, NodeState.DONE))
        state = RolloutState.STOPPED if i == 0 else RolloutState.DONE
        store.finish(r.id, state, "over", T0)
        ids.append(r.id)
    assert store.collect(store.read()) == 4  # g1, g2: two statuses each
    view = store.read().view
    assert [r.id for r in view.rollouts] == ids  # every record stays
    kept = {rid for rid, _ in view.statuses}
    assert kept == {ids[0], *ids[-NODE_HISTORY:]}
    doc = status_doc(store.read(everything=True))
    by_id = {r["id"]: r for r in doc["rollouts"]}
    assert by_id[ids[1]]["nodes"] == [] and not by_id[ids[1]]["nodesKept"]
    assert by_id[ids[5]]["nodesKept"]
    assert by_id[ids[0]]["nodesKept"]  # stopped
    assert "per-node states are kept for the newest" in render_table(doc)
    assert store.collect(store.read()) == 0  # nothing more
