"""One datastore watch per server for all its agents' long polls.

Each agent follows the coordination keys with a long poll (`watch` on the cluster route). Served
one datastore watch each, every write to the datastore woke every agent's watch on the server
(SQLite: each a query at every commit, lease refreshes included; etcd: a stream each), so a
server's idle work grew with the square of its agents. The hub follows the prefix once, keeps
the recent changes in memory, and answers every long poll from them: a write costs the server
one read, and a long poll costs it nothing but the wait.

A change wakes only the polls it concerns: each waiting poll registers its keys, and the hub's
thread, holding the new changes, sets the few whose keys match. (Waking every poll at every
change, each to look and sleep again, cost a server with a few hundred agents most of its CPU
while a fleet joined: a thread switch per poll per write.)

Nothing is lost: the hub holds every change from `_from` on (trimmed only at a revision
boundary); a poll from an older revision, or while the hub is not following (starting, after a
datastore failure or a compaction), gets None and is served by the datastore as before.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

from rke2certd.datastore.base import Datastore, Event, WatchCompacted
from rke2certd.log import log
from rke2certd.rollout import records as rec

SLICE = 30.0  # one datastore watch call (a stopped hub exits after the call in flight)
KEEP = 8192  # changes held (a rollout of a 1000-agent fleet writes a few per agent)
BACKOFF_MAX = 10.0
NOTHING = "/rke2certd-hub-empty/"  # read for the current revision only: no key lives there


@dataclass(eq=False)
class _Poll:
    """A long poll waiting: the keys it waits for, and the flag the hub sets for it."""

    prefix: str
    only: tuple[str, ...] | None
    ready: threading.Event = field(default_factory=threading.Event)

    def wants(self, events: list[Event]) -> bool:
        return bool(_matching(events, self.prefix, self.only))


def _matching(events: list[Event], prefix: str, only: tuple[str, ...] | None) -> list[Event]:
    return [
        e
        for e in events
        if e.kv.key.startswith(prefix) and (only is None or e.kv.key.startswith(only))
    ]


class WatchHub:
    def __init__(self, ds: Datastore, prefix: str = rec.PREFIX, keep: int = KEEP) -> None:
        self.ds = ds
        self.prefix = prefix
        self.keep = keep
        self._lock = threading.Lock()
        self._polls: set[_Poll] = set()  # waiting now
        self._events: list[Event] = []  # in revision order
        self._revs: list[int] = []  # their revisions, for bisect
        self._from: int | None = None  # every change from this revision on is held (None: not)
        self._next = 0  # the revision the hub watches from (0: start over)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rke2certd-watch-hub", daemon=True)

    def start(self) -> WatchHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._from = None
            self._wake_all()
        self._thread.join(timeout=1.0)  # a datastore call in flight ends with its timeout

    @property
    def following(self) -> bool:
        return self._from is not None

    def wait(
        self, prefix: str, start: int, timeout: float, only: tuple[str, ...] | None = None
    ) -> tuple[list[Event], int] | None:
        """The changes under `prefix` (and of keys starting with one of `only`, if given) from
        revision `start` on, waiting up to `timeout` for one ([] when none came), and the
        revision up to which it looked (no other change of those keys before it); None when
        the hub cannot say (ask the datastore)."""
        deadline = time.monotonic() + timeout
        cursor = start  # every change before it was looked at already
        poll = _Poll(prefix, only)
        with self._lock:
            self._polls.add(poll)
        try:
            while True:
                with self._lock:
                    if self._from is None or cursor < self._from:
                        return None
                    i = bisect.bisect_left(self._revs, cursor)
                    found = _matching(self._events[i:], prefix, only)
                    if found:
                        return found, self._next
                    cursor = max(cursor, self._next)  # all before _next is held: none matched
                    # cleared under the lock: a change added after this look sets it again
                    poll.ready.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], cursor
                poll.ready.wait(remaining)
        finally:
            with self._lock:
                self._polls.discard(poll)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._next == 0:
                    revision = self.ds.snapshot(NOTHING).revision + 1
                    with self._lock:
                        self._events, self._revs = [], []
                        self._next = self._from = revision
                events = self.ds.watch_prefix(self.prefix, self._next, SLICE)
                if events:
                    self._add(events)
                backoff = 0.5
            except WatchCompacted:
                self._reset()
            except Exception as exc:  # the polls go to the datastore meanwhile
                if self._stop.is_set():
                    return
                log.warning("watch_hub_failed", reason=str(exc), retry_in=backoff)
                self._reset()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _reset(self) -> None:
        with self._lock:
            self._from, self._next = None, 0
            self._wake_all()  # waiting polls ask the datastore

    def _wake_all(self) -> None:
        for poll in self._polls:
            poll.ready.set()

    def _add(self, events: list[Event]) -> None:
        with self._lock:
            self._events.extend(events)
            self._revs.extend(e.kv.mod_revision for e in events)
            self._next = events[-1].kv.mod_revision + 1
            if len(self._events) > self.keep:
                # drop the older half, at a revision boundary: what is held stays complete
                boundary = self._revs[len(self._revs) - self.keep // 2]
                cut = bisect.bisect_left(self._revs, boundary)
                del self._events[:cut], self._revs[:cut]
                self._from = boundary
                self._wake_all()  # a poll from before the boundary goes to the datastore
                return
            for poll in self._polls:
                if poll.wants(events):
                    poll.ready.set()
