"""The coordination keys for agent-only nodes, which hold no datastore credentials: the
endpoint's `POST /v1-rke2/cluster` runs one datastore operation for them on the server's store.

What an agent may do (its name is the `rke2-Node-Name` header of an agent-token request, proved
by its node password before this module sees it, and never a server's: `node_auth.py`):
- read every key under /rke2certd/ (registrations, rollouts, statuses, slots: nothing secret,
  and no bootstrap data, which lives elsewhere), and watch that prefix (a long poll); a read
  may ask for the changes since the revision of its last one (mirror.py);
- write only its own records, each checked to be what it claims: its registration and
  membership (phase agent), its status in a rollout, the agent phase's restart slots; two of
  those in one request (its status and the slot it frees; a slot and the slots read after it),
  each key checked as it is alone;
- take leases, and refresh or revoke only a lease it took here or that its registration is on;
- watch as a long poll only while the server holds fewer than MAX_WATCHES of them: beyond, a
  watch is answered at once with the changes so far and a time to ask again, so that many
  agents on one server never take the connections that short requests need;
- be told the server is crowded: an answer carries `"crowded": true` when the server already
  has its share of the fleet (`home`, fleet_limits.py) and this agent is not one of them (as
  the request arrived: where the agent chose to send it; a long poll's answer leaves it out if
  a later request of the agent took a place meanwhile); the agent then uses its next server
  (choice.py). It is served all the same: never refused. Each request says where this server
  is in the agent's rank (`rank`, 0: its preferred one), so that the agents that prefer a
  server are never kept out by others that merely failed over to it (home.py);
- say that it left (`leave`, sent by an agent that moved back to its preferred server): its
  place here goes to the next agent at once;
- ask the server to do the cluster's housekeeping (a failed agent stops a rollout that way);
- learn which CA generation the server holds, and the digests of the bundles it serves.

The datastore's answers go back as they are (a failed compare is `false`, not an error), so
the agent's `RemoteDatastore` keeps the contract of `rke2certd.datastore.base`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from typing import Any

from rke2certd.datastore.base import (
    KV,
    Datastore,
    Event,
    LeaseNotFound,
    Snapshot,
    WatchCompacted,
    common_prefix,
)
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.log import log
from rke2certd.node.ca_material import disk_generation
from rke2certd.pki.layout import Layout
from rke2certd.plan.rollout import Availability, Phase
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.housekeeping import housekeep
from rke2certd.supervisor import MAX_CONNECTIONS, agent_leases, wire
from rke2certd.supervisor.fleet_limits import MIN_HOME
from rke2certd.supervisor.home import Home
from rke2certd.supervisor.watch_hub import NOTHING as _NOTHING
from rke2certd.supervisor.watch_hub import WatchHub

MIN_TTL, MAX_TTL = 2, 600
MAX_LEASES_PER_NODE = 8  # a few in flight across a restart; more is a client gone wrong
# Long polls held at once: three quarters of the endpoint's connections, so that writes, slot
# takes and lease refreshes always find one.
MAX_WATCHES = MAX_CONNECTIONS * 3 // 4
MAX_ONLY = 256  # keys in a watch's filter (a barrier names each node it waits for)
BUSY_WATCH_SECONDS = 0.2  # a busy server's watch: the changes etcd sends at once, no wait
MAX_DELTA = 2048  # changes answered for a `since` read; beyond, the whole keys are smaller


class ClusterRefused(Exception):
    """An operation the caller may not do, or a malformed request: an HTTP error answer."""

    def __init__(self, status: int, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code  # machine-readable, for the client (wire.py's error codes)


@dataclass
class ServedCA:
    """What the server holds now: its CA generation and the digests of the bundles it serves."""

    generation: str | None
    bundles: Mapping[str, bytes]

    @classmethod
    def on_disk(cls, layout: Layout) -> ServedCA:
        """What a server with this data dir serves agents: its server and client CA bundles."""
        bundles = {name: layout.ca_cert(name).read_bytes() for name in ("server-ca", "client-ca")}
        return cls(disk_generation(layout), bundles)


@dataclass
class ClusterAPI:
    ds: Datastore
    clock: Callable[[], datetime]
    served: Callable[[], ServedCA]
    max_watches: int = MAX_WATCHES
    max_connections: int = MAX_CONNECTIONS  # the endpoint's (limits.py: from the fleet)
    home: InitVar[int] = MIN_HOME  # agents taken as this server's own (fleet_limits.py)
    availability: Availability = field(default_factory=Availability)  # the config's policy
    hub: WatchHub | None = None  # the server's one watch for all long polls (started by owner)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _leases: dict[int, str] = field(default_factory=dict)  # granted here -> node name
    _watching: int = 0  # long polls in progress
    _full: bool = False  # busy answered and logged; cleared once the load has halved
    _home: Home = field(init=False)  # the agents this server counts as its own
    _resize_hooks: list[Callable[[int], None]] = field(default_factory=list)  # endpoint's gate
    # for the housekeeping agents ask for at each of their ticks: one store, so that its reads
    # decode only the records that changed (records.Decoded depends on nothing but each KV)
    _store: ClusterStore = field(init=False)

    def __post_init__(self, home: int) -> None:
        self._store = ClusterStore(self.ds)
        self._home = Home(home)

    def resize(self, connections: int, watches: int, home: int | None = None) -> None:
        """New limits (limits.py, as the fleet grows or shrinks); polls in progress go on."""
        with self._lock:
            self.max_connections, self.max_watches = connections, watches
            if home is not None:
                self._home.size = home
            for hook in self._resize_hooks:
                hook(connections)

    def follow_resize(self, hook: Callable[[int], None]) -> None:
        """Call `hook` with the connection limit now and at each resize (the endpoint's gate)."""
        with self._lock:
            self._resize_hooks.append(hook)
            hook(self.max_connections)

    def unfollow_resize(self, hook: Callable[[int], None]) -> None:
        with self._lock:
            if hook in self._resize_hooks:
                self._resize_hooks.remove(hook)

    def crowded(self, node: str, now: float, rank: int = 0) -> bool:
        """Whether to tell `node` to use its next server (home.py)."""
        return self._home.crowded(node, now, rank)

    def handle(self, node: str, doc: object) -> dict[str, Any]:
        """One operation for `node`; the JSON answer. Raises ClusterRefused."""
        if not isinstance(doc, dict) or not isinstance(doc.get("op"), str):
            raise ClusterRefused(400, 'the body must be a JSON object with an "op"')
        op = doc["op"]
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise ClusterRefused(400, f"unknown operation {op[:40]!r}")
        try:  # an agent that does not say ranks every server as its preferred one
            rank = wire.integer(doc.get("rank"), "rank", optional=True) or 0
        except wire.WireError as exc:
            raise ClusterRefused(400, str(exc)) from None
        # counted as the request arrives: an answer that comes later (a long poll's, up to
        # MAX_WATCH_SECONDS) must not bring back an agent that has left meanwhile
        crowded = op != "leave" and self.crowded(node, time.monotonic(), rank)
        try:
            result: dict[str, Any] = handler(node, doc)
        except wire.WireError as exc:
            raise ClusterRefused(400, str(exc)) from None
        except LeaseNotFound as exc:
            raise ClusterRefused(404, f"lease not found: {exc}", wire.LEASE_NOT_FOUND) from None
        except WatchCompacted as exc:
            return {"compacted": exc.compact_revision}
        # judged as the request arrived; a long poll ends up to MAX_WATCH_SECONDS later, and
        # if a later request of the same agent took a place meanwhile, that word is stale
        if crowded and not self._home.holds(node):
            result["crowded"] = True
        return result

    # reads --------------------------------------------------------------------------------

    def _readable(self, key: str) -> str:
        if not key.startswith(rec.PREFIX):
            raise ClusterRefused(403, f"only keys under {rec.PREFIX} can be read here")
        return key

    def _op_get(self, _node: str, doc: dict[str, Any]) -> dict[str, Any]:
        kv = self.ds.get(self._readable(wire.key_in(doc.get("key"))))
        return {"kv": wire.kv_out(kv) if kv else None}

    def _op_snapshot(self, _node: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The keys under `prefix`, or with `end` those in [prefix, end) (an agent's planning
        read leaves the registrations' updates out: a third of the keys and of the changes);
        with `since`, the changes after that revision when the store can say."""
        prefix = self._readable(wire.key_in(doc.get("prefix"), "prefix"))
        end = None
        if doc.get("end") is not None:
            end = self._readable(wire.key_in(doc.get("end"), "end"))
            if end <= prefix:
                raise ClusterRefused(400, "end must sort after prefix")
        since = wire.integer(doc.get("since"), "since", optional=True)
        if since is not None and isinstance(self.ds, SQLiteDatastore):
            delta = self._changes(prefix, end, since)
            if delta is not None:
                return {"delta": wire.events_out(delta[0]), "revision": delta[1]}
        snap = self.ds.snapshot(prefix) if end is None else self.ds.snapshot_range(prefix, end)
        if since is not None and since <= snap.revision:
            # no history to say it (etcd, or SQLite's moved on): the keys that changed, and
            # the names of all (what the agent holds and is not named was deleted), unless
            # nearly all changed: a name is a tenth of a key's size, so the whole keys are
            # then about as small (an agent that joined early holds few of the fleet's keys)
            changed = [kv for kv in snap.kvs if kv.mod_revision > since]
            if len(changed) * 4 <= len(snap.kvs) * 3:
                return {
                    "changed": wire.snapshot_out(Snapshot(changed, snap.revision)),
                    "keys": [wire.key_out(kv.key) for kv in snap.kvs],
                }
        return {"snapshot": wire.snapshot_out(snap)}

    def _changes(self, prefix: str, end: str | None, since: int) -> tuple[list[Event], int] | None:
        """The changes under `prefix` (before `end`) after revision `since`, and the revision
        the keys are then at (mirror.py); None when a whole read is due (history gone, or it
        is smaller). SQLite only: its history read is one query, complete up to the moment it
        runs (an etcd watch sends the history in batches of its own choosing)."""
        now = self.ds.snapshot(_NOTHING).revision  # first: the changes read next reach it
        if since > now:
            return None  # a revision this store never had: the whole keys
        try:
            events = self.ds.watch_prefix(common_prefix(prefix, end or prefix), since + 1, 0)
        except WatchCompacted:
            return None
        if end is not None:
            events = [e for e in events if prefix <= e.kv.key < end]
        if len(events) > MAX_DELTA:
            return None
        return events, max([now, *(e.kv.mod_revision for e in events)])

    def _op_watch(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        prefix = self._readable(wire.key_in(doc.get("prefix"), "prefix"))
        start = wire.integer(doc.get("start_revision"), "start_revision", low=1) or 1
        timeout = doc.get("timeout", wire.MAX_WATCH_SECONDS)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise ClusterRefused(400, "timeout must be a number of seconds")
        only = self._only(doc.get("only"))
        with self._lock:
            busy = self._watching >= self.max_watches
            if not busy:
                self._watching += 1
            first_busy, self._full = busy and not self._full, busy or self._full
        if first_busy:
            log.warning(
                "cluster_watches_full",
                limit=self.max_watches,
                node=node,
                reason=f"{self.max_watches} agents hold a watch here; others poll every "
                f"{wire.BUSY_RETRY_SECONDS / 2:g}-{wire.BUSY_RETRY_SECONDS:g} s "
                "until a place frees up",
            )
        if busy:
            answer = self._watch(prefix, start, BUSY_WATCH_SECONDS, only)
            return answer | {"retry_after": wire.BUSY_RETRY_SECONDS}
        try:
            wait = min(float(timeout), wire.MAX_WATCH_SECONDS)
            answer = self._watch(prefix, start, wait, only)
        finally:
            with self._lock:
                self._watching -= 1
                # logged again once the load has halved, not at each place freed and retaken
                self._full = self._full and self._watching > self.max_watches // 2
        return answer

    def _only(self, value: object) -> tuple[str, ...] | None:
        """A watch's optional key prefixes (the agent's filter), at most MAX_ONLY of them."""
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > MAX_ONLY:
            raise ClusterRefused(400, f"only must be a list of at most {MAX_ONLY} keys")
        return tuple(wire.key_in(k, "only") for k in value)

    def _watch(
        self, prefix: str, start: int, wait: float, only: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """From the server's one watch (watch_hub.py) when it can say, else the datastore;
        with `only`, the changes of those keys alone (none else ends the wait). The answer
        says up to which revision it looked, so that an agent whose keys did not change for
        long goes on from there (not from a revision the hub no longer holds)."""
        if self.hub is not None:
            found = self.hub.wait(prefix, start, wait, only)
            if found is not None:
                return {"events": wire.events_out(found[0]), "revision": found[1]}
        events = self.ds.watch_prefix(prefix, start, wait)
        if only is None:
            return {"events": wire.events_out(events)}
        looked = events[-1].kv.mod_revision + 1 if events else start
        kept = [e for e in events if e.kv.key.startswith(only)]
        return {"events": wire.events_out(kept), "revision": looked}

    # writes -------------------------------------------------------------------------------

    def _writable(self, node: str, key: str, value: bytes | None) -> None:
        """Only the caller's own records, each of the kind its key says (value None: delete)."""
        try:
            own = {rec.node_key(node), rec.member_key(node), rec.update_key(node)}
        except Exception:
            raise ClusterRefused(400, "the node name is not usable") from None
        rollout_id = rec.status_rollout(key)
        if key in own:
            kind = "membership" if key.startswith(rec.MEMBERS) else "registration"
        elif rollout_id is not None:
            try:
                mine = {rec.status_key(rollout_id, node)}
            except Exception:
                mine = set()
            if key not in mine:
                raise ClusterRefused(403, f"{key[:200]} is not this agent's rollout status key")
            kind = "status"
        elif key.startswith(f"{rec.SLOTS}{Phase.AGENT.value}/"):
            kind = "slot"
        else:
            raise ClusterRefused(403, f"an agent may write only its own records, not {key[:200]}")
        if value is None:
            if kind == "slot":
                current = self.ds.get(key)
                if current is not None and rec.slot_holder(current) != node:
                    raise ClusterRefused(403, f"{key} is held by another node")
            return
        self._check_value(node, key, kind, value)

    def _check_value(self, node: str, key: str, kind: str, value: bytes) -> None:
        kv = KV(key, value, 0, 0)
        try:
            if kind == "registration":
                reg = rec.decode_registration(kv)
                ok = reg.name == node and reg.phase is Phase.AGENT
            elif kind == "membership":
                m = rec.decode_member(kv)
                ok = m.name == node and m.phase is Phase.AGENT
            elif kind == "status":
                ok = rec.decode_status(kv).node == node
            else:
                ok = rec.slot_holder(kv) == node
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ClusterRefused(
                403, f"{key[:200]}: the value is not this agent's own {kind} record"
            )

    def _lease_of(self, node: str, doc: dict[str, Any]) -> int | None:
        lease = wire.integer(doc.get("lease"), "lease", low=1, optional=True)
        if lease is not None:
            self._own_lease(node, lease)
        return lease

    def _own_lease(self, node: str, lease: int, status: int = 403) -> None:
        """Granted to `node` here or by any other server (agent_leases: the owner lives in the
        datastore, so an agent's lease survives the server that granted it), or its
        registration is on it (a lease granted by an older server). A lease that is not alive
        is "not found" (404, coded) for every operation: its owner key went with it, and the
        agent that held it must learn so and take a new one. A live lease of another node (a
        server's own has no owner key) is refused (403) for a write; for refresh/revoke it is
        "not found" (404) too, so the agent never touches it."""
        with self._lock:
            if self._leases.get(lease) == node:
                return
        if agent_leases.owner(self.ds, lease) == node:  # granted by another server
            with self._lock:
                self._leases[lease] = node
            return
        reg = self.ds.get(rec.node_key(node))
        if reg is None or reg.lease != lease:
            if not self.ds.lease_alive(lease):
                raise ClusterRefused(
                    404, f"lease {lease} expired or was revoked", wire.LEASE_NOT_FOUND
                )
            code = wire.LEASE_NOT_FOUND if status == 404 else None
            raise ClusterRefused(status, f"lease {lease} is not this agent's", code)

    def _op_create(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        key, value = wire.key_in(doc.get("key")), wire.unb64(doc.get("value"), "value")
        self._writable(node, key, value)
        return {"ok": self.ds.create(key, value, self._lease_of(node, doc))}

    def _op_cas(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        key, value = wire.key_in(doc.get("key")), wire.unb64(doc.get("value"), "value")
        expected = wire.integer(doc.get("expected_mod_revision"), "expected_mod_revision")
        self._writable(node, key, value)
        lease = self._lease_of(node, doc)
        return {"ok": self.ds.compare_and_swap(key, value, expected or 0, lease)}

    def _op_put(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        key, value = wire.key_in(doc.get("key")), wire.unb64(doc.get("value"), "value")
        self._writable(node, key, value)
        self.ds.put(key, value, self._lease_of(node, doc))
        return {"ok": True}

    def _op_delete(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        key = wire.key_in(doc.get("key"))
        expected = wire.integer(
            doc.get("expected_mod_revision"), "expected_mod_revision", optional=True
        )
        self._writable(node, key, None)
        return {"ok": self.ds.delete(key, expected)}

    def _op_cas_delete(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        """A compare-and-swap, then (only if it wrote) a delete: a node's final status and the
        restart slot it frees, in one request. Each key checked as its own operation is."""
        key, value = wire.key_in(doc.get("key")), wire.unb64(doc.get("value"), "value")
        expected = wire.integer(doc.get("expected_mod_revision"), "expected_mod_revision")
        gone = wire.key_in(doc.get("delete_key"), "delete_key")
        gone_expected = wire.integer(
            doc.get("delete_expected_mod_revision"), "delete_expected_mod_revision", optional=True
        )
        if gone == key:
            raise ClusterRefused(400, "delete_key must be another key than key")
        self._writable(node, key, value)
        self._writable(node, gone, None)
        lease = self._lease_of(node, doc)
        ok, deleted = self.ds.swap_then_delete(
            key, value, expected or 0, gone, gone_expected, lease
        )
        return {"ok": ok, "deleted": deleted}

    def _op_create_snapshot(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        """A create, then the keys under `prefix` read after it: a restart slot taken and the
        slots as they are then (the limit is checked on them), in one request."""
        key, value = wire.key_in(doc.get("key")), wire.unb64(doc.get("value"), "value")
        prefix = self._readable(wire.key_in(doc.get("prefix"), "prefix"))
        self._writable(node, key, value)
        lease = self._lease_of(node, doc)
        ok, snap = self.ds.create_then_snapshot(key, value, lease, prefix)
        return {"ok": ok, "snapshot": wire.snapshot_out(snap)}

    # leases -------------------------------------------------------------------------------

    def _op_grant_lease(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        ttl = wire.integer(doc.get("ttl"), "ttl", low=MIN_TTL) or MIN_TTL
        if ttl > MAX_TTL:
            raise ClusterRefused(400, f"ttl must be at most {MAX_TTL} seconds")
        with self._lock:
            if sum(1 for n in self._leases.values() if n == node) >= MAX_LEASES_PER_NODE:
                # forget the oldest: expired leases are never revoked by a client that lost them
                oldest = next(k for k, n in self._leases.items() if n == node)
                del self._leases[oldest]
        lease = self.ds.grant_lease(ttl)
        agent_leases.record(self.ds, lease, node)  # any server accepts it from `node`
        with self._lock:
            self._leases[lease] = node
        return {"lease": lease}

    def _op_refresh_lease(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        lease = wire.integer(doc.get("lease"), "lease", low=1) or 0
        self._own_lease(node, lease, 404)
        return {"ttl": self.ds.refresh_lease(lease)}

    def _op_revoke_lease(self, node: str, doc: dict[str, Any]) -> dict[str, Any]:
        lease = wire.integer(doc.get("lease"), "lease", low=1) or 0
        self._own_lease(node, lease, 404)
        ok = self.ds.revoke_lease(lease)
        with self._lock:
            self._leases.pop(lease, None)
        return {"ok": ok}

    # the server's own work ----------------------------------------------------------------

    def _op_housekeep(self, _node: str, _doc: dict[str, Any]) -> dict[str, Any]:
        policy = self.availability
        return {"wrote": housekeep(self._store, self._store.read(), self.clock(), policy)}

    def _op_leave(self, node: str, _doc: dict[str, Any]) -> dict[str, Any]:
        return {"had": self._home.left(node)}  # (not counted by handle: it is leaving)

    def _op_generation(self, _node: str, _doc: dict[str, Any]) -> dict[str, Any]:
        served = self.served()
        return {
            "generation": served.generation,
            "bundles": {k: hashlib.sha256(v).hexdigest() for k, v in served.bundles.items()},
        }
