"""The datastore contract: an etcd-shaped key-value store with revisions, leases and watches.

Both backends (an embedded SQLite file, etcd) follow etcd's semantics so that code written
against one runs unchanged on the other:

- one store-wide revision, incremented by every change (a transaction is one revision);
- every key carries the revision that created it and the one that last changed it;
- every update is a compare-and-swap on `mod_revision` (0 = "the key does not exist");
- a lease expires `ttl` seconds after its last refresh and deletes the keys attached to it;
- a watch returns the changes under a prefix from a revision on, or nothing on timeout.

A write whose answer was lost (a member died mid-request) and whose retry can no longer tell
whether the first attempt applied raises `OutcomeUnknown` instead of guessing: `False` from
`create`/`compare_and_swap`/`delete` always means "the compare failed, nothing changed".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Self

from rke2certd.errors import DatastoreError


class DatastoreUnavailable(DatastoreError):
    """No endpoint answered (refused, timed out, no leader): worth retrying after a pause."""


class OutcomeUnknown(DatastoreError):
    """A write may or may not have been applied; read the key again to find out."""


class LeaseNotFound(DatastoreError):
    """The lease expired or was revoked; keys attached to it are gone."""


class WatchCompacted(DatastoreError):
    """The requested start revision is older than the history the store keeps."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """The keys under a prefix and the store revision they were read at."""

    kvs: list[KV]
    revision: int


class EventType(Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Event:
    """One change; for a DELETE, `kv.value` is empty and `kv.mod_revision` is the delete's."""

    type: EventType
    kv: KV


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end); b"\\0" = no end."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def common_prefix(start: str, end: str) -> str:
    """The longest prefix every key in [start, end) shares with both ends."""
    n = 0
    while n < min(len(start), len(end)) and start[n] == end[n]:
        n += 1
    return start[:n]


def key_bytes(key: str) -> bytes:
    # surrogateescape: keys written by other etcd clients need not be UTF-8, and must round-trip.
    return key.encode("utf-8", "surrogateescape")


def key_str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Datastore(ABC):
    """An etcd-shaped store. Use as a context manager, or call `close()`."""

    #: where the data lives, for messages (never holds credentials)
    location: str = ""

    @abstractmethod
    def get(self, key: str) -> KV | None:
        """The key's current value, or None."""

    @abstractmethod
    def snapshot(self, prefix: str) -> Snapshot:
        """Every key starting with `prefix`, sorted, with the revision of the read.

        To follow a prefix: `snap = ds.snapshot(p)`, then `ds.watch_prefix(p, snap.revision + 1,
        timeout)` returns exactly the changes made after the read.
        """

    def snapshot_range(self, start: str, end: str) -> Snapshot:
        """Every key in [start, end), sorted, with the revision of the read (one consistent
        read). This default reads the prefix the two share and drops the rest; a store that
        can range-read overrides it."""
        snap = self.snapshot(common_prefix(start, end))
        return Snapshot([kv for kv in snap.kvs if start <= kv.key < end], snap.revision)

    def get_prefix(self, prefix: str) -> list[KV]:
        return self.snapshot(prefix).kvs

    @abstractmethod
    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Write `key` only if it does not exist. True if written (first creator wins)."""

    @abstractmethod
    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        """Write `key` only if its mod_revision is `expected_mod_revision` (0: absent).

        The lease of the new value is `lease` (None detaches it, as an etcd put does).
        """

    def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        """Write `key` whatever it holds (last writer wins: for marks whose only message is
        that they changed). A store with a blind write overrides this read-and-swap loop."""
        for _ in range(8):
            kv = self.get(key)
            if self.compare_and_swap(key, value, kv.mod_revision if kv else 0, lease):
                return
        raise DatastoreUnavailable(f"{key} kept changing under 8 writes; try again")

    @abstractmethod
    def delete(self, key: str, expected_mod_revision: int | None = None) -> bool:
        """Delete `key` (only at `expected_mod_revision` if given). True if it was deleted."""

    def swap_then_delete(
        self,
        key: str,
        value: bytes,
        expected_mod_revision: int,
        delete_key: str,
        delete_expected: int | None,
        lease: int | None = None,
    ) -> tuple[bool, bool]:
        """`compare_and_swap(key, ...)`, then, only if it wrote, `delete(delete_key,
        delete_expected)`: (swapped, deleted). One round trip where the store is remote; a
        store that can do both in one transaction overrides this (both changes then reach a
        watcher, and any read, together)."""
        if not self.compare_and_swap(key, value, expected_mod_revision, lease):
            return False, False
        return True, self.delete(delete_key, delete_expected)

    def create_then_snapshot(
        self, key: str, value: bytes, lease: int | None, prefix: str
    ) -> tuple[bool, Snapshot]:
        """`create(key, ...)`, then `snapshot(prefix)` read after it: (created, snapshot)."""
        return self.create(key, value, lease), self.snapshot(prefix)

    @abstractmethod
    def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease that expires `ttl_seconds` after its last refresh; returns its id."""

    @abstractmethod
    def refresh_lease(self, lease_id: int) -> int:
        """Restart the lease's TTL; returns the TTL. Raises LeaseNotFound if it expired."""

    @abstractmethod
    def revoke_lease(self, lease_id: int) -> bool:
        """End the lease now, deleting its keys. False if it had already ended."""

    @abstractmethod
    def lease_alive(self, lease_id: int) -> bool:
        """Whether the lease exists and has not expired, without refreshing it. False for an
        expired, revoked or never granted lease: the keys attached to it are gone (or never
        were), which a missing key alone cannot tell from "never attached"."""

    @abstractmethod
    def watch_prefix(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        """Wait for changes under `prefix` at revision >= `start_revision`.

        Returns the first batch of changes (oldest first; history is returned at once), or
        [] after `timeout` seconds. Continue from `events[-1].kv.mod_revision + 1`. Raises
        WatchCompacted if `start_revision` is older than the kept history.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
