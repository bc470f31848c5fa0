"""A node's periodic look: the few keys its current step depends on, instead of everything.

Between wake-ups a node reads the coordination keys again every RECHECK seconds, in case a
wake-up was lost. Through a server that read is the whole fleet (every node's registration,
membership and status); a thousand agents waiting in line for their restart, each reading the
whole fleet every 30 s, cost the servers and the agents work in N per look and N squared per
rollout, although each of them waits for one thing only. So a node that is idle, or waits with
its link to the cluster healthy, looks at the keys its step waits on (`look_for`) and compares
them with what its last full read saw of them (`Look.marks`); it reads everything only when
they moved. What such a look does not cover (nodes joining or leaving, membership: the whole
fleet's keys) still wakes it through its watch, and a waiting node reads everything every
LOOKS_PER_READ looks anyway, which also refreshes the words of its wait (its place in line).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from rke2certd.datastore.base import KV, Datastore
from rke2certd.plan.rollout import Idle, Phase, Step, Wait
from rke2certd.rollout import records as rec

LOOKS_PER_READ = 10  # a waiting node's looks between two full reads (an idle one: no limit)
MAX_KEYS = 8  # a wait on more keys than this (a barrier on many nodes) reads everything


@dataclass(frozen=True)
class Look:
    prefixes: tuple[str, ...]  # every key under these (a few: rollout records, slots)
    keys: tuple[str, ...]  # and these, one by one
    marks: frozenset[tuple[str, int]]  # (key, revision) of those the last full read saw
    left: int | None  # looks before a full read anyway (None: no limit)
    # under the slots prefix, only the slots this node holds count (None: every slot): a
    # queue moves when the node ahead takes one, not at each hand-off further up the line
    holder: str | None = None

    def seen(self, kvs: Iterable[KV]) -> frozenset[tuple[str, int]]:
        """The marks of those among `kvs` this look covers."""
        return _marks(self.prefixes, self.keys, kvs, self.holder)

    def read(self, ds: Datastore) -> frozenset[tuple[str, int]]:
        """The marks as they are now: a small read per prefix and per key."""
        kvs: list[KV] = []
        for prefix in self.prefixes:
            kvs.extend(ds.snapshot(prefix).kvs)
        for key in self.keys:
            kv = ds.get(key)
            if kv is not None:
                kvs.append(kv)
        return self.seen(kvs)

    def next(self) -> Look | None:
        """This look once taken: None when the next one must be a full read."""
        if self.left is None:
            return self
        return replace(self, left=self.left - 1) if self.left > 1 else None


def look_for(step: Step, phase: Phase, active: bool, kvs: Iterable[KV]) -> Look | None:
    """PURE: the look that may stand in for a full read after `step` (decided on a full read
    of `kvs`; `active`: a rollout is in progress), or None (read everything).

    Idle with no rollout in progress: the rollout records (a new one is what it waits for).
    Idle in a rollout in progress (done with it, or not in it): a server reads everything (its
    status line says the rollout's phase, and it keeps house for the cluster); an agent looks
    at the rollout records (agents restart last: once done, its line says the agents' phase
    until the record moves) and reads everything every LOOKS_PER_READ looks, as a waiter does.
    A thousand done agents each reading the whole fleet every RECHECK, while the rest of the
    line restarted, cost the servers (and at 1000 agents, each hand-off) work in N per look.
    Waiting: the rollout records, and what ends its wait: the status of each node of a barrier
    or of the node ahead in line (it reports, or is skipped); for a queue, the slots the node
    ahead holds (it takes one: the next may take another); for a slot wait, the slots of its
    phase (one freed); the registration of a node down (it comes back). Anything else (about
    to apply, restart, or take a slot): everything. A queue that looked at every slot of its
    phase would read everything at each hand-off up the line: in a long line, every look."""
    if isinstance(step, Idle):
        if not active:
            return _look((rec.ROLLOUTS,), (), kvs, None)
        return _look((rec.ROLLOUTS,), (), kvs) if phase is Phase.AGENT else None
    if not isinstance(step, Wait):
        return None
    slots = f"{rec.SLOTS}{phase.value}/"
    r = step.rollout.id
    if step.on == "slot":
        return _look((rec.ROLLOUTS, slots), (), kvs)
    if step.blocker is None:
        return None
    if step.on == "barrier":
        names = step.barrier_nodes
        if len(names) > MAX_KEYS:
            return None
        return _look((rec.ROLLOUTS,), tuple(rec.status_key(r, n) for n in names), kvs)
    if step.on == "queue":
        ahead = tuple(rec.status_key(r, n) for n in step.queue_nodes)
        return _look((rec.ROLLOUTS, slots), ahead, kvs, holder=step.blocker)
    if step.on == "down":
        keys = (rec.status_key(r, step.blocker), rec.node_key(step.blocker))
        return _look((rec.ROLLOUTS,), keys, kvs)
    return None


def _look(
    prefixes: tuple[str, ...],
    keys: tuple[str, ...],
    kvs: Iterable[KV],
    left: int | None = LOOKS_PER_READ,
    holder: str | None = None,
) -> Look:
    return Look(prefixes, keys, _marks(prefixes, keys, kvs, holder), left, holder)


def _marks(
    prefixes: tuple[str, ...], keys: tuple[str, ...], kvs: Iterable[KV], holder: str | None
) -> frozenset[tuple[str, int]]:
    """(key, revision) of those among `kvs` under one of `prefixes` or one of `keys` exactly
    (node c1's status key is a prefix of c10's); with a `holder`, of the slots only those it
    holds (an unreadable slot counts: the full read then says what it is)."""
    exact = set(keys)

    def covered(kv: KV) -> bool:
        if kv.key in exact:
            return True
        if not kv.key.startswith(prefixes):
            return False
        if holder is None or not kv.key.startswith(rec.SLOTS):
            return True
        return rec.slot_holder(kv) in (holder, None)

    return frozenset((kv.key, kv.mod_revision) for kv in kvs if covered(kv))
