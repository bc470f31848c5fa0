"""The coordination keys as an agent-only node sees them: a `Datastore` whose every call is one
`POST /v1-rke2/cluster` to a server's endpoint (see cluster_api.py for what it may do there).

With it, an agent runs the same rollout code as a server (registry, slots, statuses, watch):
only the transport differs. Calls go over the pinned channel with the agent token and the node
password that proves this node's name; the trusted CAs are read at each call (`trust()`), so
that an agent that has just taken a rotated CA set keeps talking to servers that already serve
the new one, and to those that do not yet.

Calls reuse kept-alive connections (connections.py): an idle agent's lease refreshes and long
polls cost no TLS handshake each.

Errors map onto the contract: no server answered -> DatastoreUnavailable (retried by the
rollout code), a refusal coded `lease-not-found` (wire.py) -> LeaseNotFound, a compacted watch ->
WatchCompacted, any other refusal -> DatastoreError with the server's reason.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rke2certd.datastore.base import (
    KV,
    Datastore,
    DatastoreUnavailable,
    Event,
    LeaseNotFound,
    Snapshot,
    WatchCompacted,
)
from rke2certd.errors import DatastoreError, Rke2certdError, TokenError
from rke2certd.log import log
from rke2certd.rollout.records import PLANNING
from rke2certd.supervisor import CLUSTER_PATH, wire
from rke2certd.supervisor.choice import PREFER_AGAIN, ServerChoice
from rke2certd.supervisor.client import (
    DEFAULT_TIMEOUT,
    RefusedError,
    UnreachableError,
    post_json,
)
from rke2certd.supervisor.connections import Connections
from rke2certd.supervisor.mirror import Mirror

_T = TypeVar("_T")
UNKNOWN_OP_RETRY = 600.0  # seconds before a server that did not know an operation is asked again


class RemoteDatastore(Datastore):
    def __init__(
        self,
        urls: Sequence[str],
        token: Callable[[], str],
        trust: Callable[[], bytes],
        node_name: str,
        *,
        node_password: Callable[[], str],
        timeout: float = DEFAULT_TIMEOUT,
        prefer_again: float = PREFER_AGAIN,
    ) -> None:
        self.urls = list(urls)  # ranked for this node (supervisor_urls)
        self.choice = ServerChoice(self.urls, prefer_again)
        self._token = token
        self._node_password = node_password
        self._trust = trust
        self.node_name = node_name
        self.timeout = timeout
        self.location = f"the coordination keys of {', '.join(self.urls)}"
        self._closed = threading.Event()
        self._mirror = Mirror(*PLANNING)  # what the rules read, kept up to date by changes
        self._unknown_ops: dict[str, float] = {}  # refused as unknown -> until when not asked
        # kept-alive connections: this node's threads (main loop, lease, long poll) each reuse
        # one instead of a TLS handshake per call
        self._connections = Connections()

    def _post(self, doc: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request, to the servers in the choice's order; the first answer counts."""
        problems: list[str] = []
        failed: set[str] = set()  # the servers that did not answer this request
        mismatch: TokenError | None = None
        token, trust, password = self._token(), self._trust(), self._node_password()
        moves = self.choice.moves  # a move while this request is out makes its answer late
        for url in self.choice.order(time.monotonic()):
            try:
                answer = post_json(
                    [url],
                    token,
                    trust,
                    CLUSTER_PATH,
                    doc | {"rank": self.choice.rank(url)},  # the server's place (crowded)
                    self.node_name,
                    node_password=password,
                    timeout=timeout,
                    pool=self._connections,
                )
            except UnreachableError as exc:
                problems.append(str(exc))
                failed.add(url)
                continue
            except TokenError as exc:  # this server serves a CA we do not trust (yet)
                mismatch = mismatch or exc
                failed.add(url)
                continue
            crowded = answer.get("crowded") is True  # served; the next request goes elsewhere
            if crowded:
                self.choice.crowded(url, time.monotonic(), moves)
            before = self.choice.current  # (a move since `moves` makes answered() None)
            if not crowded and self.choice.answered(url, moves) is not None:
                home = url == self.choice.preferred
                if home and before not in failed:  # it kept a place for us there
                    self._leave(before)
                log.info(
                    "server_chosen",
                    node=self.node_name,
                    server_url=url,
                    preferred=home,
                    reason="its preferred server answers again"
                    if home
                    else "; ".join(problems) or "the server before did not answer or is crowded",
                )
            return answer
        if mismatch is not None:
            raise mismatch
        raise UnreachableError("; ".join(problems))

    def _leave(self, url: str) -> None:
        """Tell `url` this agent went home, in the background: the place it kept for us goes to
        the next agent at once (cluster_api.py), not when it stops expecting us. Best effort: a
        server that does not answer, or does not know the operation, frees it in time anyway."""

        def leave() -> None:
            try:
                post_json(
                    [url],
                    self._token(),
                    self._trust(),
                    CLUSTER_PATH,
                    {"op": "leave"},
                    self.node_name,
                    node_password=self._node_password(),
                    timeout=self.timeout,
                    pool=self._connections,
                )
            except Rke2certdError as exc:
                log.debug("server_leave_failed", server_url=url, reason=str(exc))

        if not self._closed.is_set():
            threading.Thread(target=leave, name="rke2certd-leave", daemon=True).start()

    def _call(self, doc: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        try:
            answer = self._post(doc, timeout or self.timeout)
        except UnreachableError as exc:
            raise DatastoreUnavailable(str(exc)) from exc
        except TokenError as exc:
            raise DatastoreError(str(exc)) from exc
        except RefusedError as exc:
            if exc.code == wire.LEASE_NOT_FOUND:
                raise LeaseNotFound(str(exc)) from exc
            raise DatastoreError(str(exc)) from exc
        if "compacted" in answer:
            revision = answer["compacted"]
            raise WatchCompacted(f"history before revision {revision} is gone", int(revision))
        return answer

    def _parse(self, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except (wire.WireError, KeyError, TypeError) as exc:
            raise DatastoreUnavailable(f"{self.location}: a malformed answer ({exc})") from exc

    def get(self, key: str) -> KV | None:
        answer = self._call({"op": "get", "key": wire.key_out(key)})
        return self._parse(lambda: wire.kv_in(answer["kv"]) if answer["kv"] else None)

    def snapshot(self, prefix: str) -> Snapshot:
        answer = self._call({"op": "snapshot", "prefix": wire.key_out(prefix)})
        return self._parse(lambda: wire.snapshot_in(answer["snapshot"]))

    def snapshot_range(self, start: str, end: str) -> Snapshot:
        if (start, end) == (self._mirror.prefix, self._mirror.end):  # the changes since
            with self._mirror.lock:
                answer = self._call(self._mirror.request())
                return self._parse(lambda: self._mirror.take(answer))
        return super().snapshot_range(start, end)

    def _ok(self, doc: dict[str, Any]) -> bool:
        answer = self._call(doc)
        return bool(self._parse(lambda: answer["ok"]))

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        return self._ok(
            {"op": "create", "key": wire.key_out(key), "value": wire.b64(value), "lease": lease}
        )

    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        return self._ok(
            {
                "op": "cas",
                "key": wire.key_out(key),
                "value": wire.b64(value),
                "expected_mod_revision": expected_mod_revision,
                "lease": lease,
            }
        )

    def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        doc = {"op": "put", "key": wire.key_out(key), "value": wire.b64(value), "lease": lease}
        self._ok(doc)

    def delete(self, key: str, expected_mod_revision: int | None = None) -> bool:
        return self._ok(
            {
                "op": "delete",
                "key": wire.key_out(key),
                "expected_mod_revision": expected_mod_revision,
            }
        )

    def swap_then_delete(
        self,
        key: str,
        value: bytes,
        expected_mod_revision: int,
        delete_key: str,
        delete_expected: int | None,
        lease: int | None = None,
    ) -> tuple[bool, bool]:
        doc = {
            "op": "cas_delete",
            "key": wire.key_out(key),
            "value": wire.b64(value),
            "expected_mod_revision": expected_mod_revision,
            "delete_key": wire.key_out(delete_key),
            "delete_expected_mod_revision": delete_expected,
            "lease": lease,
        }
        answer = self._combined(doc)
        if answer is None:  # an older server: one request each
            args = (key, value, expected_mod_revision, delete_key, delete_expected, lease)
            return super().swap_then_delete(*args)
        return self._parse(lambda: (bool(answer["ok"]), bool(answer["deleted"])))

    def create_then_snapshot(
        self, key: str, value: bytes, lease: int | None, prefix: str
    ) -> tuple[bool, Snapshot]:
        doc = {
            "op": "create_snapshot",
            "key": wire.key_out(key),
            "value": wire.b64(value),
            "lease": lease,
            "prefix": wire.key_out(prefix),
        }
        answer = self._combined(doc)
        if answer is None:
            return super().create_then_snapshot(key, value, lease, prefix)
        return self._parse(lambda: (bool(answer["ok"]), wire.snapshot_in(answer["snapshot"])))

    def _combined(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """`doc`'s answer, or None when a server does not know the operation (an older one:
        nothing was done; the caller makes the requests it stands for). Such a server is
        asked again only after UNKNOWN_OP_RETRY: it may have been upgraded meanwhile."""
        op = doc["op"]
        if time.monotonic() < self._unknown_ops.get(op, 0.0):
            return None
        try:
            return self._call(doc)
        except DatastoreError as exc:
            if not isinstance(exc.__cause__, RefusedError) or exc.__cause__.status != 400:
                raise
            if f"unknown operation {op!r}" not in str(exc):
                raise
        self._unknown_ops[op] = time.monotonic() + UNKNOWN_OP_RETRY
        return None

    def grant_lease(self, ttl_seconds: int) -> int:
        answer = self._call({"op": "grant_lease", "ttl": ttl_seconds})
        return int(self._parse(lambda: answer["lease"]))

    def refresh_lease(self, lease_id: int) -> int:
        answer = self._call({"op": "refresh_lease", "lease": lease_id})
        return int(self._parse(lambda: answer["ttl"]))

    def revoke_lease(self, lease_id: int) -> bool:
        return self._ok({"op": "revoke_lease", "lease": lease_id})

    def lease_alive(self, lease_id: int) -> bool:
        # Not an operation of the cluster route: an agent learns that its own lease is gone
        # from LeaseNotFound on a refresh or a write, and may not probe other nodes' leases.
        raise DatastoreError(
            f"{self.location}: an agent cannot ask whether lease {lease_id} is alive; "
            "refresh it instead"
        )

    def watch_prefix(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        return self.watch_only(prefix, start_revision, timeout, None)[0]

    def watch_only(
        self, prefix: str, start_revision: int, timeout: float, only: Sequence[str] | None
    ) -> tuple[list[Event], int | None]:
        """`watch_prefix`, the server keeping the poll to the changes of keys starting with one
        of `only` (an older server sends every change: the caller filters anyway); and the
        revision up to which the server looked, when it says (go on from there)."""
        wait = min(timeout, wire.MAX_WATCH_SECONDS)
        doc: dict[str, Any] = {
            "op": "watch",
            "prefix": wire.key_out(prefix),
            "start_revision": start_revision,
            "timeout": wait,
        }
        if only is not None:
            doc["only"] = [wire.key_out(k) for k in only]
        answer = self._call(doc, timeout=wait + self.timeout)
        events = self._parse(lambda: wire.events_in(answer["events"]))
        retry = answer.get("retry_after")
        if not events and isinstance(retry, int | float) and not isinstance(retry, bool):
            # the server holds all the long polls it will: poll, spread out, until it has room
            self._closed.wait(min(wait, max(1.0, float(retry)) * random.uniform(0.5, 1.0)))
        looked = answer.get("revision")
        ok = isinstance(looked, int) and not isinstance(looked, bool) and looked >= start_revision
        return events, looked if ok else None

    # not part of the Datastore contract: the server's own work, asked for

    def housekeep(self) -> bool:
        """Ask the server to do the cluster's housekeeping; True when it wrote something."""
        answer = self._call({"op": "housekeep"})
        return bool(self._parse(lambda: answer["wrote"]))

    def served_generation(self) -> tuple[str | None, dict[str, str]]:
        """The server's CA generation and the SHA-256 of each CA bundle it serves."""
        answer = self._call({"op": "generation"})

        def parse() -> tuple[str | None, dict[str, str]]:
            gen, bundles = answer["generation"], answer["bundles"]
            if not (gen is None or isinstance(gen, str)) or not isinstance(bundles, dict):
                raise TypeError("generation/bundles")
            return gen, {str(k): str(v) for k, v in bundles.items()}

        return self._parse(parse)

    def close(self) -> None:
        self._closed.set()  # a busy watch's wait ends
        self._connections.close()
