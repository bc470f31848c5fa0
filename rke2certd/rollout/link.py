"""The node's link to the cluster: background threads that wake the main loop.

- keep-alive: refreshes the node's lease every ttl/3; when the lease was lost (the node was cut
  off longer than the TTL) it takes a new one, and the main loop registers again: that is how
  a node that was away comes back;
- watch: follows changes and wakes the main loop for those that may concern it.

What wakes whom. A server is woken by the structural keys (records.STRUCTURE: membership, a
node coming or going, rollout records: a few writes per rollout, which every node must hear
about) and by its own wake key, which the node that frees a slot or reports writes for the few
nodes that may go on now (plan/rollout.py `to_wake`). With etcd those are two long-lived
streams that etcd filters itself, so a status or slot write reaches nobody's watch and a
hand-off wakes one node, whatever the cluster's size; they never change, so no new stream (a
TLS handshake) is ever on a hand-off's path. With SQLite (its watch wakes every process at any
write anyway) the same filter runs here. Agents (a long poll of the whole prefix through a
server; they may not write other nodes' keys) are woken by what their current step waits for
(`interest`, set after each step; the changes that came in since the read the step was decided
on are judged again under it, so none is lost between two interests).

They decide nothing and write nothing but lease refreshes. The main loop reads the keys again
when woken: one range read, always a consistent snapshot, never a cache that could drift
(records.Decoded only skips decoding a key's value again).
Each thread has its own connection (the main loop's may be busy in a long read); with SQLite,
the main loop's own (see roles/server.py `own_connection`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rke2certd.datastore.base import (
    Datastore,
    Event,
    EventType,
    LeaseNotFound,
    WatchCompacted,
)
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.plan.rollout import TERMINAL_NODE_STATES, Idle, Phase, Step, Wait
from rke2certd.rollout import records as rec
from rke2certd.rollout.records import PREFIX

if TYPE_CHECKING:
    from rke2certd.datastore.stream import WatchStream  # requests: only for etcd
    from rke2certd.node.node import Node

WATCH_SLICE = 30.0  # longest single SQLite watch call (a close() ends it at once)
BACKOFF_MAX = 10.0
RECENT = 512  # changes kept to judge again under a new interest (more: wake, to be safe)
# longest an agent's watch waits for the main loop's next interest (then it looks, keeping the
# changes for that interest, and waits again)
INTEREST_WAIT = 5.0


@dataclass
class _Feed:
    """One watch: an etcd stream on a key range, or (None) the datastore's own watch of the
    whole prefix; and the revision to go on from, so a reconnect misses nothing."""

    stream: WatchStream | None
    name: str = "watch"
    revision: int | None = None


class ClusterLink:
    def __init__(
        self,
        open_ds: Callable[[], Datastore],
        ttl: int,
        own_key: str,
        wake: Callable[[], None],
        streams: Sequence[WatchStream] = (),
        interest: Callable[[Event], bool] | None = None,
        *,
        lease_thread: bool = True,
    ) -> None:
        """`streams`: etcd watch streams, one thread each (none: the whole prefix through the
        datastore's watch); `interest`: a fixed filter (servers) instead of one set per step;
        `lease_thread` False: no keep-alive thread, the caller calls `keep_alive` when it says
        (a process that runs many nodes keeps their leases with one timer, not a thread each)."""
        self._open = open_ds
        self.ttl = ttl
        self._own_key = own_key
        self._wake = wake
        self._feeds = [_Feed(s, f"watch-{i}") for i, s in enumerate(streams)] or [_Feed(None)]
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._threads = []
        if lease_thread:
            lease = threading.Thread(target=self._keepalive, name="rke2certd-lease", daemon=True)
            self._threads.append(lease)
        for feed in self._feeds:
            name = f"rke2certd-{feed.name}"
            self._threads.append(
                threading.Thread(target=self._watch, args=(feed,), name=name, daemon=True)
            )
        self.lease: int | None = None
        # each thread's last failure, until it works again (another thread working does not
        # mean this one does): for the status line
        self._errors: dict[str, str] = {}
        # Which changes wake the main loop: fixed on servers; on agents set by the runner after
        # each step, so that a node waiting for one thing is not woken (and does not read) for
        # every change of the others.
        self.interest: Callable[[Event], bool] = interest or (lambda _event: True)
        # the latest changes, and the lock that hands each one to exactly one interest
        self._recent: deque[Event] = deque(maxlen=RECENT)
        self._lock = threading.Lock()
        # agents: the keys the server may keep their long poll to (server_filter), and a flag
        # set when the main loop has decided on what the last delivered change woke it for
        self._only: tuple[str, ...] | None = None
        self._rewind: int | None = None
        self._interest_set = threading.Event()
        self._lease_ds: Datastore | None = None
        self._lease_backoff = 0.5

    def start(self, lease: int) -> None:
        self.lease = lease
        for t in self._threads:
            t.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        for feed in self._feeds:
            if feed.stream is not None:
                feed.stream.close()
        for t in self._threads:
            t.join(wait)  # a call in flight ends with its timeout; they are daemon threads

    def set_interest(
        self,
        interest: Callable[[Event], bool],
        revision: int,
        only: tuple[str, ...] | None = None,
    ) -> None:
        """Wake for `interest` from now on, and at once if a change after `revision` (the read
        the step was decided on) came in meanwhile: the previous interest judged it, and it
        may have let pass what this one waits for (a lost wake-up would stall the node until
        RECHECK)."""
        with self._lock:
            self.interest = interest
            if self._only is not None:
                # the next poll looks again from just after the read the step was decided on:
                # a poll that went on past it kept to the old keys. An unfiltered one (a
                # server's) delivered every change, which `recent` judges again below.
                self._rewind = revision + 1
            self._only = only if only is None else (*only, self._own_key)
            recent = list(self._recent)
        self._interest_set.set()
        newer = [e for e in recent if e.kv.mod_revision > revision]
        complete = len(recent) < RECENT or recent[0].kv.mod_revision <= revision
        if any([self._relevant(e, interest) for e in newer]) or not complete:
            self._poke()

    def take_changed(self) -> bool:
        """True once after every change seen (and at start)."""
        if self._changed.is_set():
            self._changed.clear()
            return True
        return False

    def _poke(self) -> None:
        self._changed.set()
        self._wake()

    def _relevant(self, event: Event, interest: Callable[[Event], bool] | None = None) -> bool:
        if event.kv.key == self._own_key:
            return event.type is EventType.DELETE  # our registration is gone: register again
        return (interest or self.interest)(event)

    @property
    def error(self) -> str | None:
        """A failure some thread has not got over yet, for the status line."""
        failing = tuple(self._errors.values())  # one step under the GIL: threads write it
        return failing[0] if failing else None

    def _failed(self, who: str, exc: Exception, backoff: float) -> float:
        """Log a failure once (not at every retry), wake the loop for its status line, pause."""
        self._report(who, exc, backoff)
        self._stop.wait(backoff)
        return min(BACKOFF_MAX, backoff * 2)

    def _report(self, who: str, exc: Exception, backoff: float) -> None:
        message = str(exc) if isinstance(exc, Rke2certdError) else repr(exc)
        if message != self._errors.get(who):
            log.warning("cluster_link_failed", reason=message, retry_in=backoff, thread=who)
        self._errors[who] = message
        self._poke()

    def _ok(self, who: str) -> None:
        if self._errors.pop(who, None) is not None:
            log.info("cluster_link_restored", reason="the datastore answers again", thread=who)
            self._poke()

    # -- keep-alive thread -------------------------------------------------------------------

    def _keepalive(self) -> None:
        delay = self.ttl / 3
        while not self._stop.wait(delay):
            delay = self.keep_alive()

    def keep_alive(self) -> float:
        """Refresh the lease once (take a new one when it was lost); the seconds until the
        next call: ttl/3, or after a failure a pause that doubles up to BACKOFF_MAX."""
        if self._stop.is_set():
            return self.ttl / 3
        try:
            self._lease_ds = self._lease_ds or self._open()
            self._refresh(self._lease_ds)
        except Exception as exc:  # never die: the node would fall out of the cluster
            if self._stop.is_set():
                return self.ttl / 3
            backoff = self._lease_backoff
            self._report("lease", exc, backoff)
            self._lease_backoff = min(BACKOFF_MAX, backoff * 2)
            return backoff
        self._ok("lease")
        self._lease_backoff = 0.5
        return self.ttl / 3

    def _refresh(self, ds: Datastore) -> None:
        lease = self.lease
        try:
            if lease is not None:
                ds.refresh_lease(lease)
                return
        except LeaseNotFound:
            log.warning(
                "lease_lost",
                reason=f"lease {lease} expired (no refresh for {self.ttl}s); registering again",
            )
        self.lease = ds.grant_lease(self.ttl)
        self._poke()  # the main loop sees a new lease and registers again

    # -- watch thread --------------------------------------------------------------------------

    def _watch(self, feed: _Feed) -> None:
        ds: Datastore | None = None
        backoff = 0.5
        while not self._stop.is_set():
            try:
                ds = ds or self._open()
                if feed.revision is None:
                    # the revision now: a read of the few rollout keys, not the whole prefix
                    # (an agent reads through a server: a fleet's worth of records)
                    feed.revision = ds.snapshot(rec.ROLLOUTS).revision + 1
                    self._poke()  # the main loop reads what it may have missed
                self._follow(ds, feed)
                self._ok(feed.name)
                backoff = 0.5
            except WatchCompacted:
                feed.revision = None  # from now on; the main loop re-reads everything
            except Exception as exc:  # never die: the node would miss its turn
                if self._stop.is_set():
                    return  # stopped while a call was in flight (its connection closed)
                backoff = self._failed(feed.name, exc, backoff)

    def _follow(self, ds: Datastore, feed: _Feed) -> None:
        """Watch from the feed's revision until the stream ends (or for one SQLite slice),
        keeping the next revision to watch from, so a reconnect after a failure misses
        nothing."""
        assert feed.revision is not None
        watch_only = getattr(ds, "watch_only", None)  # an agent's remote store
        looked: int | None = None
        with self._lock:
            only = self._only
            if self._rewind is not None:
                feed.revision = min(feed.revision, self._rewind)
                self._rewind = None
        # The main loop has not said yet what it waits for next (a long step, such as an apply
        # while the whole fleet applies): a quick look, not a long poll kept to the old keys,
        # which would hold back a change the next step waits for until it times out.
        owed = watch_only is not None and only is not None and not self._interest_set.is_set()
        if feed.stream is not None:
            batches = feed.stream.batches(feed.revision)
        elif watch_only is not None:
            wait = 0.0 if owed else WATCH_SLICE
            events, looked = watch_only(PREFIX, feed.revision, wait, only)
            batches = iter([events])
        else:
            batches = iter([ds.watch_prefix(PREFIX, feed.revision, WATCH_SLICE)])
        if looked is not None:  # nothing of ours before it: go on from there
            feed.revision = max(feed.revision, looked)
        for events in batches:
            if not events:
                continue
            feed.revision = max(feed.revision, events[-1].kv.mod_revision + 1)
            with self._lock:  # each change is judged by the interest it arrived under
                self._recent.extend(events)
                relevant = self.interest
            if any([self._relevant(e, relevant) for e in events]):
                self._interest_set.clear()
                self._poke()
                if watch_only is not None and only is not None:
                    # the next poll goes out with what the main loop waits for next: one
                    # sent with the old keys could hold back a change the new step waits for
                    self._interest_set.wait(INTEREST_WAIT)
                    owed = False  # waited already
            if self._stop.is_set():
                break
        if owed:  # the quick looks, paced, until the main loop says
            self._interest_set.wait(INTEREST_WAIT)


def direct_link(
    node: Node, open_ds: Callable[[], Datastore], wake: Callable[[], None]
) -> ClusterLink:
    """A server's link: the structural range and its own wake key (etcd: two streams that etcd
    filters; SQLite: its watch of the whole prefix, filtered here)."""
    cfg = node.cfg
    wake_key = rec.wake_key(cfg.node)
    streams = []
    if cfg.datastore_endpoint.strip().lower().startswith(("http://", "https://")):
        # etcd only: requests and etcd3gw cost ~8 MiB of RSS that a SQLite daemon need not hold
        from rke2certd.node.rke2_datastore import stream_for

        streams = [s for key, end in server_ranges(wake_key) if (s := stream_for(node, key, end))]
    own = rec.node_key(cfg.node)
    return ClusterLink(open_ds, cfg.registry_ttl, own, wake, streams, server_interest(wake_key))


def relayed_link(
    node: Node,
    open_ds: Callable[[], Datastore],
    wake: Callable[[], None],
    *,
    lease_thread: bool = True,
) -> ClusterLink:
    """An agent's link: the whole prefix through a server, filtered by each step's interest."""
    own = rec.node_key(node.cfg.node)
    return ClusterLink(open_ds, node.cfg.registry_ttl, own, wake, lease_thread=lease_thread)


def server_filter(step: Step, phase: Phase) -> tuple[str, ...] | None:
    """The keys (prefixes) a server may keep an agent's long poll to after `step` (None:
    everything), so that a change wakes the few agents it concerns, not every agent's poll.
    A superset of what `interest` lets through, with one exception: a queue waiter is not sent
    the slot the node ahead takes (only that node's status, and that of `Wait.then`): it moves
    on when that node reports, which is enough (the slot taken only changed the words of its
    wait)."""
    structure = (rec.NODES, rec.MEMBERS, rec.ROLLOUTS)
    if isinstance(step, Idle):
        return (rec.ROLLOUTS,)
    if not isinstance(step, Wait):
        return None
    if step.on == "barrier" and step.blocker:
        return structure + tuple(rec.status_key(step.rollout.id, n) for n in step.barrier_nodes)
    if step.on == "queue" and step.blocker:
        return structure + tuple(rec.status_key(step.rollout.id, n) for n in step.queue_nodes)
    if step.on == "down" and step.blocker:
        return (*structure, rec.status_key(step.rollout.id, step.blocker))
    if step.on == "slot":
        return (*structure, f"{rec.SLOTS}{phase.value}/")
    return None


def server_interest(wake_key: str, arrivals: bool = True) -> Callable[[Event], bool]:
    """What wakes a server: its wake key being set, a node coming or going (not its updates),
    membership, rollout records. Exactly what its etcd streams carry.

    `arrivals` False (an idle server, see `ServerRollout.follow`): a node's registration or
    membership being written does not wake it. Nothing an idle server does depends on one, and
    a fleet starting would otherwise have every server read the whole fleet at each arrival
    (quadratic in the fleet). A node going (its registration deleted: the server records it
    down), a membership removed and every rollout record still wake it."""

    def relevant(event: Event) -> bool:
        key, kv = event.kv.key, event.kv
        if key == wake_key:
            return event.type is EventType.PUT  # not the writer's lease expiring
        if key.startswith(rec.NODES):
            if event.type is EventType.DELETE:
                return True
            return arrivals and kv.create_revision == kv.mod_revision
        if key.startswith(rec.MEMBERS) and event.type is EventType.PUT:
            return arrivals
        return rec.STRUCTURE <= key < rec.STRUCTURE_END

    return relevant


def server_ranges(wake_key: str) -> list[tuple[str, str]]:
    """The key ranges a server's etcd streams watch: [key, end)."""
    return [(rec.STRUCTURE, rec.STRUCTURE_END), (wake_key, wake_key + "\0")]


def interest(step: Step, phase: Phase) -> Callable[[Event], bool]:
    """The changes that may let this node go on after `step`: a node coming or going (not its
    updates), membership, rollout records, and what it waits for: a barrier opens when the last
    node it waits for is done (or failed), not at each of them; a queue moves when the node
    ahead takes a slot or reports (and reads again when the node that lets that one go reports,
    `Wait.then`); a slot wait ends when a slot of its phase changes.
    Everything else is somebody else's business; RECHECK covers a miss (and refreshes the
    wait's words meanwhile). Status keys match exactly: node c1's key is a prefix of c10's."""
    statuses: frozenset[str] = frozenset()  # the status keys waited on
    barrier: set[str] = set()  # a barrier's keys not reported done (or failed) yet
    slots: str | None = None  # the slot prefix of this node's phase, when it waits on slots
    ahead: str | None = None  # a queue moves when the node ahead takes a slot (or reports)
    if isinstance(step, Wait) and step.on == "barrier" and step.blocker:
        statuses = frozenset(rec.status_key(step.rollout.id, n) for n in step.barrier_nodes)
        barrier = set(statuses)
    elif isinstance(step, Wait) and step.on == "queue" and step.blocker:
        statuses = frozenset(rec.status_key(step.rollout.id, n) for n in step.queue_nodes)
        slots, ahead = f"{rec.SLOTS}{phase.value}/", step.blocker
    elif isinstance(step, Wait) and step.on == "slot":
        slots = f"{rec.SLOTS}{phase.value}/"
    elif isinstance(step, Wait) and step.on == "down" and step.blocker:
        # a server skips the down node (a status write) once its grace is over
        statuses = frozenset({rec.status_key(step.rollout.id, step.blocker)})
    opens = bool(barrier)  # only when all of them are done (a queue: at any change)
    depth = rec.ROLLOUTS.count("/")
    # An idle node waits for a rollout record only: nodes coming and going are none of its
    # business (a fleet starting would otherwise have every agent read at every arrival).
    idle = isinstance(step, Idle)

    def relevant(event: Event) -> bool:
        key, kv = event.kv.key, event.kv
        if idle:
            return key.startswith(rec.ROLLOUTS) and key.count("/") == depth
        if key.startswith(rec.NODES):
            return event.type is EventType.DELETE or kv.create_revision == kv.mod_revision
        if key.startswith(rec.MEMBERS):
            return True
        if key.startswith(rec.ROLLOUTS) and key.count("/") == depth:
            return True
        if slots is not None and key.startswith(slots):
            if ahead is None:
                return True
            if event.type is EventType.DELETE:
                return False  # a slot freed is for the node at the head of the queue
            return rec.slot_holder(kv) in (ahead, None)  # unreadable: let the main loop say
        if key not in statuses:
            return False
        if opens and event.type is EventType.PUT:
            try:
                if rec.decode_status(kv).state not in TERMINAL_NODE_STATES:
                    return False
            except (ValueError, KeyError, TypeError):
                return True  # unreadable: let the main loop read it and say so
            barrier.discard(key)
            return not barrier  # a second report of one node does not count twice
        return True

    return relevant
