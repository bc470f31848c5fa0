"""An agent's whole read of the coordination keys, brought up to date by the changes since.

An agent decides each step on a read of the whole prefix (rollout/runner.py), through a server:
in a fleet of N agents that is N registrations and memberships, so every read cost the server
and the agent work in N, and a rollout's agent phase (a few reads per agent, one agent after
another) grew with N squared. The agent keeps its last whole read here and asks the server for
the changes since its revision (`since`). The server answers them (cluster_api.py) from its
datastore's history when it can; else (etcd, or SQLite's history moved on) with the keys whose
revision is newer and the names of all of them (a key held and not named was deleted), unless
nearly all changed; else, and from an older server, with the whole prefix. Either way the
result is the keys as they are at one revision, a consistent snapshot as a whole read would be.

The mirror holds a range, [prefix, end): what the agent plans with (rec.PLANNING leaves the
registrations' updates out, written by every node as it goes and read by none of them). An
older server that does not know `end` answers the whole prefix: what lies past the end is
dropped here.
"""

from __future__ import annotations

import threading
from typing import Any

from rke2certd.datastore.base import KV, EventType, Snapshot
from rke2certd.supervisor import wire


class Mirror:
    def __init__(self, prefix: str, end: str | None = None) -> None:
        self.prefix = prefix
        self.end = end  # None: every key under prefix
        self.revision: int | None = None  # of the read held (None: none yet)
        self._kvs: dict[str, KV] = {}
        self.lock = threading.Lock()  # a request and the answer it gets go together

    def request(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"op": "snapshot", "prefix": wire.key_out(self.prefix)}
        if self.end is not None:
            doc["end"] = wire.key_out(self.end)
        if self.revision is not None:
            doc["since"] = self.revision
        return doc

    def _held(self, key: str) -> bool:
        return self.end is None or key < self.end

    def _named(self, keys: list[str], changed: Snapshot) -> dict[str, KV]:
        """The keys now: each named one as changed, else as held (newer than what is held)."""
        assert self.revision is not None
        if changed.revision < self.revision:
            raise wire.WireError("changes older than the keys held")
        fresh = {kv.key: kv for kv in changed.kvs}
        if not fresh.keys() <= set(keys):
            raise wire.WireError("a changed key that is not named")
        kvs: dict[str, KV] = {}
        for key in keys:
            if not key.startswith(self.prefix):
                raise wire.WireError(f"{key!r} outside the prefix")
            kv = fresh.get(key) or self._kvs.get(key)
            if kv is None:  # neither changed nor held: what is held is not what the server had
                raise wire.WireError(f"{key!r} is neither changed nor held")
            if self._held(key):
                kvs[key] = kv
        return kvs

    def take(self, answer: dict[str, Any]) -> Snapshot:
        """The keys at the answer's revision (raises wire.WireError, KeyError, TypeError on a
        malformed answer, and then forgets what it held: the next read is a whole one)."""
        try:
            if "delta" in answer and self.revision is not None:
                events = wire.events_in(answer["delta"])
                revision = wire.integer(answer["revision"], "revision", low=self.revision)
                assert revision is not None
                for event in events:
                    if not event.kv.key.startswith(self.prefix):
                        raise wire.WireError(f"a change of {event.kv.key!r} outside the prefix")
                    if event.type is EventType.DELETE:
                        self._kvs.pop(event.kv.key, None)
                    elif self._held(event.kv.key):
                        self._kvs[event.kv.key] = event.kv
            elif "changed" in answer and self.revision is not None:
                snap = wire.snapshot_in(answer["changed"])
                self._kvs = self._named(wire.keys_in(answer["keys"]), snap)
                revision = snap.revision
            else:
                snap = wire.snapshot_in(answer["snapshot"])
                self._kvs = {kv.key: kv for kv in snap.kvs if self._held(kv.key)}
                revision = snap.revision
        except Exception:
            self.revision, self._kvs = None, {}
            raise
        self.revision = revision
        return Snapshot([self._kvs[k] for k in sorted(self._kvs)], revision)
