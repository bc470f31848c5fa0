"""Reads and writes of the coordination keys, each write a compare-and-swap on what was read.

Nothing here decides anything (plan/rollout.py does); this is the I/O, written so that two
nodes doing the same thing at once cannot both succeed where only one may (create-if-absent for
rollouts and slots, CAS on mod_revision for updates), and so that a write whose answer was lost
(`OutcomeUnknown`) is settled by reading the key again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

from rke2certd.datastore.base import (
    KV,
    Datastore,
    DatastoreUnavailable,
    OutcomeUnknown,
    Snapshot,
)
from rke2certd.plan.rollout import (
    Member,
    NodeStatus,
    Registration,
    Rollout,
    RolloutState,
    Slot,
    superseded,
)
from rke2certd.rollout import records as rec

CAS_ATTEMPTS = 8
HISTORY = 20  # finished rollouts kept for `rke2certd status`
# ... and the per-node statuses of the newest few of them: every node's every read carries them
# (N keys per rollout), and the rules need none of a rollout that is done or superseded
NODE_HISTORY = 3


class ClusterStore:
    def __init__(self, ds: Datastore) -> None:
        self.ds = ds
        self._decoded = rec.Decoded()  # a node reads often: decode only what changed
        # (rollout, node, attempt) this process reported blocked: the event once, not per tick
        self.blocked_reported: set[tuple[str, str, int]] = set()

    def read(self, everything: bool = False) -> rec.Parsed:
        """One consistent read. By default what the rules need (rec.PLANNING: the nodes' updates
        and wake keys left out, 2 of every 5 keys); `everything` for `rke2certd status`."""
        if everything:
            return rec.parse(self.ds.snapshot(rec.PREFIX), self._decoded)
        return rec.parse(self.ds.snapshot_range(*rec.PLANNING), self._decoded)

    def reread_slots(self, parsed: rec.Parsed) -> rec.Parsed:
        """`parsed` with the restart slots read again: one small read where only they can
        have changed in a way that matters (a node that just took one checks the limit)."""
        return self._with_slots(parsed, self.ds.snapshot(rec.SLOTS))

    def _with_slots(self, parsed: rec.Parsed, fresh: Snapshot) -> rec.Parsed:
        kvs = {k: kv for k, kv in parsed.kvs.items() if not k.startswith(rec.SLOTS)}
        kvs.update((kv.key, kv) for kv in fresh.kvs)
        merged = Snapshot(sorted(kvs.values(), key=lambda kv: kv.key), parsed.revision)
        return rec.parse(merged, self._decoded)

    # -- primitives --------------------------------------------------------------------------

    def update(
        self,
        key: str,
        change: Callable[[KV | None], bytes | None],
        lease: int | None = None,
        seen: rec.Parsed | None = None,
    ) -> bool:
        """Read `key`, let `change` give its new value (None: leave it), compare-and-swap;
        again on a conflict. True if this call wrote. With `seen` (a snapshot just read), the
        first try swaps against it without reading the key again: one round trip, not two."""
        for attempt in range(CAS_ATTEMPTS):
            kv = seen.kvs.get(key) if seen is not None and attempt == 0 else self.ds.get(key)
            value = change(kv)
            if value is None:
                return False
            fresh = seen is None or attempt > 0  # equal in a snapshot is not equal now
            if fresh and kv is not None and kv.value == value and kv.lease == lease:
                return False
            try:
                if self.ds.compare_and_swap(key, value, kv.mod_revision if kv else 0, lease):
                    return True
            except OutcomeUnknown:
                now = self.ds.get(key)
                if now is not None and now.value == value:
                    return True
        raise DatastoreUnavailable(f"{key} kept changing under {CAS_ATTEMPTS} writes; try again")

    def put(
        self, key: str, value: bytes, lease: int | None = None, seen: rec.Parsed | None = None
    ) -> bool:
        return self.update(key, lambda _kv: value, lease, seen)

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Create-if-absent; a lost answer is settled by reading back our own value."""
        try:
            return self.ds.create(key, value, lease)
        except OutcomeUnknown:
            kv = self.ds.get(key)
            return kv is not None and kv.value == value

    # -- registry ----------------------------------------------------------------------------

    def register(self, reg: Registration, lease: int) -> None:
        """The registration, written once per lease (every node watches it come and go); an
        update of an earlier registration is dropped (it would override this one)."""
        self.put(rec.node_key(reg.name), rec.encode_registration(reg), lease)
        self.ds.delete(rec.update_key(reg.name))

    def report(self, reg: Registration, lease: int) -> None:
        """A registration's update (generation, health, activity): another key, which no
        node watches, so that these writes wake nobody; only its node writes it (a blind
        write, on its lease)."""
        self.ds.put(rec.update_key(reg.name), rec.encode_registration(reg), lease)

    def wake(self, name: str, mark: bytes, lease: int | None) -> None:
        """Set `name`'s wake key (a blind write: only that it changed matters), on the
        writer's lease so that marks do not outlive their writers."""
        self.ds.put(rec.wake_key(name), mark, lease)

    def ensure_member(self, member: Member) -> bool:
        """Create the membership, or correct its roles; a live node is never `down`."""
        fresh = dataclasses.replace(member, down_since=None)

        def change(kv: KV | None) -> bytes | None:
            if kv is not None:
                try:
                    if rec.decode_member(kv) == fresh:
                        return None
                except (ValueError, KeyError, TypeError):
                    pass  # unreadable: overwrite with a good one
            return rec.encode_member(fresh)

        return self.update(rec.member_key(member.name), change)

    def mark_down(self, name: str, since: datetime) -> bool:
        def change(kv: KV | None) -> bytes | None:
            if kv is None:
                return None
            m = rec.decode_member(kv)
            return (
                None
                if m.down_since
                else rec.encode_member(dataclasses.replace(m, down_since=since))
            )

        return self.update(rec.member_key(name), change)

    def remove_member(self, name: str) -> bool:
        return self.ds.delete(rec.member_key(name))

    # -- rollouts ----------------------------------------------------------------------------

    def create_rollout(self, rollout: Rollout, now: datetime) -> tuple[Rollout, bool]:
        """Create the record if absent (several servers may start the same CA rollout); a
        new CA rollout supersedes the older active ones. Returns the stored record."""
        key = rec.rollout_key(rollout.id)
        created = self.create(key, rec.encode_rollout(rollout))
        if not created:  # started by another node (or by this one's apply): one key, not all
            kv = self.ds.get(key)
            try:
                return (rec.decode_rollout(kv) if kv is not None else rollout), False
            except (ValueError, KeyError, TypeError):
                return rollout, False  # a newer daemon's record: `read()` reports it
        parsed = self.read()
        stored = parsed.view.rollout(rollout.id)
        if stored is None:  # finished and collected at once: cannot happen with HISTORY > 0
            return rollout, True
        for old in superseded(parsed.view, stored):
            self.finish(old.id, RolloutState.SUPERSEDED, f"superseded by {stored.id}", now)
        return stored, True

    def finish(self, rollout_id: str, state: RolloutState, reason: str, now: datetime) -> bool:
        """Move an ACTIVE rollout to `state`; False if it was no longer active."""

        def change(kv: KV | None) -> bytes | None:
            if kv is None:
                return None
            r = rec.decode_rollout(kv)
            if r.state is not RolloutState.ACTIVE:
                return None
            return rec.encode_rollout(
                dataclasses.replace(r, state=state, state_reason=reason, finished=now)
            )

        return self.update(rec.rollout_key(rollout_id), change)

    def resume(self, rollout_id: str) -> bool:
        """A stopped rollout becomes active again, as a new attempt: the nodes that failed or
        reported `stopped` in the last one start over (apply, then wait for their turn); one
        compare-and-swap, so no node sees the rollout active with the old failures."""

        def change(kv: KV | None) -> bytes | None:
            cur = rec.decode_rollout(kv) if kv is not None else None
            if cur is None or cur.state is not RolloutState.STOPPED:
                return None
            again = dataclasses.replace(
                cur,
                state=RolloutState.ACTIVE,
                state_reason="",
                finished=None,
                attempt=cur.attempt + 1,
            )
            return rec.encode_rollout(again)

        return self.update(rec.rollout_key(rollout_id), change)

    def set_status(
        self, rollout: Rollout, status: NodeStatus, seen: rec.Parsed | None = None
    ) -> NodeStatus:
        """Write a node's status, stamped with the rollout's current attempt; the status
        written."""
        stamped, key, value = self._status_record(rollout, status)
        self.put(key, value, None, seen)
        return stamped

    @staticmethod
    def _status_record(rollout: Rollout, status: NodeStatus) -> tuple[NodeStatus, str, bytes]:
        """The status as written (stamped with the rollout's current attempt), its key, value."""
        stamped = dataclasses.replace(status, attempt=rollout.attempt)
        return stamped, rec.status_key(rollout.id, status.node), rec.encode_status(stamped)

    def report_and_release(
        self, rollout: Rollout, status: NodeStatus, seen: rec.Parsed, slot: Slot, slot_kv: KV | None
    ) -> NodeStatus:
        """`set_status`, then `release_slot`: when neither key changed since `seen` (the
        common case), one call; otherwise (or a lost answer) the two, as they do it. The
        status first: a slot freed before it would let the next node restart while this
        node's report might still fail."""
        stamped, key, value = self._status_record(rollout, status)
        kv = seen.kvs.get(key)
        if slot_kv is not None and rec.slot_holder(slot_kv) == slot.node:
            try:
                wrote, freed = self.ds.swap_then_delete(
                    key, value, kv.mod_revision if kv else 0, slot_kv.key, slot_kv.mod_revision
                )
            except OutcomeUnknown:
                wrote, freed = False, False  # settled below: its value is read back
            if wrote:
                if not freed:
                    self.release_slot(slot)
                return stamped
        try:
            self.put(key, value, None, seen)
        finally:
            self.release_slot(slot, slot_kv)
        return stamped

    def skip(self, rollout: Rollout, status: NodeStatus, seen: rec.Parsed) -> bool:
        """Mark a node SKIPPED unless its status changed since `seen` (it came back and
        reported meanwhile). True if this call wrote it (several servers may try at once)."""
        key = rec.status_key(rollout.id, status.node)
        before = seen.kvs.get(key)
        value = rec.encode_status(dataclasses.replace(status, attempt=rollout.attempt))

        def change(kv: KV | None) -> bytes | None:
            same = kv.mod_revision == before.mod_revision if kv and before else kv is before
            return value if same else None

        return self.update(key, change)

    def collect(
        self, parsed: rec.Parsed, keep: int = HISTORY, keep_nodes: int = NODE_HISTORY
    ) -> int:
        """Delete the oldest finished rollouts (and their statuses) beyond `keep`, and the
        statuses of done or superseded ones beyond `keep_nodes` (a stopped rollout keeps
        them: `rollout resume` goes on from them). Returns the number of keys deleted."""
        records, statuses = collectable(parsed, keep, keep_nodes)
        gone = 0
        for key in statuses:
            gone += self.ds.delete(key)
        for key in records:
            gone += self.ds.delete(key, parsed.kvs[key].mod_revision)
        return gone

    # -- restart slots -----------------------------------------------------------------------

    def take_slot(self, slot: Slot, lease: int) -> bool:
        return self.create(rec.slot_key(slot.phase, slot.index), rec.encode_slot(slot), lease)

    def take_slot_and_reread(
        self, slot: Slot, lease: int, parsed: rec.Parsed
    ) -> tuple[bool, rec.Parsed]:
        """`take_slot`, then `reread_slots(parsed)`, in one call where the store allows."""
        key, value = rec.slot_key(slot.phase, slot.index), rec.encode_slot(slot)
        try:
            taken, fresh = self.ds.create_then_snapshot(key, value, lease, rec.SLOTS)
        except OutcomeUnknown:
            return self.take_slot(slot, lease), self.reread_slots(parsed)  # read back
        return taken, self._with_slots(parsed, fresh)

    def release_slot(self, slot: Slot, seen: KV | None = None) -> bool:
        """Delete the slot if it is still `slot.node`'s (`seen`: its key as last read, which
        saves the read when nothing changed since). A lost answer is settled by reading."""
        key = rec.slot_key(slot.phase, slot.index)
        for kv in ([seen] if seen is not None else []) + [None] * CAS_ATTEMPTS:
            kv = kv or self.ds.get(key)
            if kv is None or rec.slot_holder(kv) != slot.node:
                return False
            try:
                if self.ds.delete(key, kv.mod_revision):
                    return True
            except OutcomeUnknown:
                continue  # read again: gone (ours went through) or still there (retry)
        return False


def collectable(
    parsed: rec.Parsed, keep: int = HISTORY, keep_nodes: int = NODE_HISTORY
) -> tuple[list[str], list[str]]:
    """The rollout records, and the status keys, that `collect` deletes."""
    done = [r for r in parsed.view.rollouts if not r.active]
    old = done[: max(0, len(done) - keep)]
    thin = {
        r.id
        for r in done[max(0, len(done) - keep) : max(0, len(done) - keep_nodes)]
        if r.state is not RolloutState.STOPPED
    } | {r.id for r in old}
    records = [rec.rollout_key(r.id) for r in old]
    below = tuple(key + "/" for key in records)  # whatever lives under an old record
    statuses = [k for k in parsed.kvs if rec.status_rollout(k) in thin or k.startswith(below)]
    return records, statuses
