"""The embedded datastore: one SQLite file with etcd's semantics (see base.py).

- WAL mode and a busy timeout, so several rke2certd processes on the node share the file;
  every write runs in `BEGIN IMMEDIATE`, so two writers serialise instead of deadlocking.
- One revision counter (table `meta`), bumped once per changing transaction.
- An `events` table keeps the last HISTORY revisions of changes, returned by watches exactly as
  etcd does. SQLite cannot notify another process, so a watch waits on inotify for writes to
  the database's WAL (every commit writes it; reads write nothing), and polls only where inotify
  is unavailable.
- Leases are rows with an expiry on the injected clock; expired leases and their keys are
  deleted (as DELETE events) at the next access by any process.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from rke2certd.clock import Clock, system_clock
from rke2certd.datastore.base import (
    KV,
    Datastore,
    DatastoreUnavailable,
    Event,
    EventType,
    LeaseNotFound,
    Snapshot,
    WatchCompacted,
    key_bytes,
    key_str,
    prefix_end,
)
from rke2certd.datastore.change_watch import ChangeWatch
from rke2certd.errors import DatastoreError
from rke2certd.files.atomic import ensure_dir
from rke2certd.log import log

DEFAULT_RELATIVE_PATH = Path("server/db/rke2certd.sqlite")
HISTORY = 1000  # revisions of events kept for watches (kine keeps 1000 as well)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL,
    create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL, lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl INTEGER NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, key BLOB NOT NULL, deleted INTEGER NOT NULL, value BLOB NOT NULL,
    create_revision INTEGER NOT NULL, lease INTEGER, PRIMARY KEY (revision, key)
);
"""


# Without inotify, a watch polls: every `poll_interval` while the store is busy, every IDLE_POLL
# once nothing has changed for ACTIVE_WINDOW.
IDLE_POLL = 4.0
ACTIVE_WINDOW = 10.0
LEASE_MARGIN = 0.01  # wake this long after the next lease expiry, not just before it
MIN_LEASE_TTL = 1  # seconds (etcd's minimum is larger): what bounds the reaping's looks


class SQLiteDatastore(Datastore):
    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = system_clock,
        busy_timeout: float = 30.0,
        poll_interval: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
        history: int = HISTORY,
    ) -> None:
        self.path = path
        self._history = history
        self.location = f"SQLite file {path}"
        self._clock = clock
        self._poll = poll_interval
        self._last_activity = time.monotonic()
        self._sleep = sleep
        self._lock = threading.RLock()  # one connection, shared by the daemon's threads
        self._interrupt: int | None = None  # eventfd: close() wakes the watches waiting
        self._polling_logged = False
        # the last look for expired leases (injected clock), and when one may be due next
        self._checked_at = float("inf")
        self._reap_due = float("-inf")
        self._conn = self._open(busy_timeout)

    # -- set-up ----------------------------------------------------------------------------

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        ensure_dir(self.path.parent, 0o700)
        try:
            # Create the file 0600 ourselves: SQLite would use the umask, and gives its
            # -wal/-shm files the mode of the database file. Only when it is missing: closing
            # any fd of an open database drops the POSIX locks of every connection to it in
            # this process (another process could then remove the WAL under them).
            if not self.path.exists():
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            os.chmod(self.path, 0o600)
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise DatastoreError(f"cannot open the datastore {self.path}: {exc}") from exc
        try:
            with self._sqlite_errors():
                self._enable_wal(conn, busy_timeout)
                conn.execute("PRAGMA synchronous=FULL")  # CA keys: a commit survives power loss
            with self._write_txn(conn):
                self._check_foreign(conn)
                _create_schema(conn)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection, busy_timeout: float) -> None:
        """Switch to WAL. SQLite does not call the busy handler for this change, so two
        processes opening a new file at once get "database is locked": wait and retry."""
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                self._sleep(0.02)

    def _check_foreign(self, conn: sqlite3.Connection) -> None:
        """Refuse a file that is not ours: never add tables to kine's state.db, for one."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='kine'").fetchone():
            raise DatastoreError(
                f"{self.path} is RKE2's kine database, not rke2certd's; point "
                "datastore-endpoint at another file (or leave it empty for the default)"
            )
        if conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
            raise DatastoreError(f"{self.path} was written by a newer rke2certd; upgrade this node")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._interrupt is not None:  # a waiting watch returns (and fails to read)
                os.eventfd_write(self._interrupt, 1)

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """SQLite's exceptions as rke2certd's: busy (worth a retry) or anything else."""
        try:
            yield
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                # another process held the write lock past the busy timeout
                raise DatastoreUnavailable(f"the datastore {self.path} is busy: {exc}") from exc
            raise DatastoreError(f"the datastore {self.path} failed: {exc}") from exc

    @contextlib.contextmanager
    def _write_txn(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so a read-then-write never has to be
        upgraded (which is where SQLite writers deadlock and fail with SQLITE_BUSY)."""
        c = conn or self._conn
        with self._lock, self._sqlite_errors():
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read_txn(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot of several SELECTs (WAL readers never block the writer)."""
        self._reap_if_due()
        with self._lock, self._sqlite_errors():
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _now(self) -> float:
        return self._clock().timestamp()

    @staticmethod
    def _revision(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

    def _bump(self, conn: sqlite3.Connection) -> int:
        """Start a new revision for this transaction's changes and drop old history."""
        rev = self._revision(conn) + 1
        conn.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
        if rev > self._history and rev % max(1, self._history // 10) == 0:  # prune in batches
            cut = rev - self._history
            conn.execute("DELETE FROM events WHERE revision <= ?", (cut,))
            conn.execute("UPDATE meta SET value=? WHERE name='compacted'", (cut,))
        return rev

    # -- leases --------------------------------------------------------------------------------

    def _reap_if_due(self) -> None:
        """Delete expired leases and their keys; a cheap read first, a write only if needed.

        Only when a lease may have expired since the last look (`_reap_due`), not at every
        access: the look takes the store lock, which every request of a busy server waits for.
        """
        now = self._now()
        if self._checked_at <= now < self._reap_due:
            return
        with self._lock, self._sqlite_errors():
            now = self._now()
            (first,) = self._conn.execute("SELECT MIN(expires_at) FROM leases").fetchone()
            if first is not None and first <= now:
                with self._write_txn() as conn:
                    expired = conn.execute(
                        "SELECT id FROM leases WHERE expires_at <= ?", (now,)
                    ).fetchall()
                    for (lease_id,) in expired:
                        self._drop_lease(conn, lease_id)
                    (first,) = conn.execute("SELECT MIN(expires_at) FROM leases").fetchone()
            # A lease granted after this look (here or by another process) has a TTL of at
            # least MIN_LEASE_TTL: none can expire before the earliest one known or that.
            self._checked_at = now
            self._reap_due = (
                now + MIN_LEASE_TTL if first is None else min(first, now + MIN_LEASE_TTL)
            )

    def _drop_lease(self, conn: sqlite3.Connection, lease_id: int) -> None:
        keys = [r[0] for r in conn.execute("SELECT key FROM kv WHERE lease=?", (lease_id,))]
        conn.execute("DELETE FROM leases WHERE id=?", (lease_id,))
        if keys:
            rev = self._bump(conn)  # like etcd: one revision for all keys of a revoked lease
            for key in keys:
                self._delete_row(conn, key, rev)

    def _check_lease(self, conn: sqlite3.Connection, lease: int | None) -> None:
        if lease is None:
            return
        row = conn.execute("SELECT expires_at FROM leases WHERE id=?", (lease,)).fetchone()
        if row is None or row[0] <= self._now():
            raise LeaseNotFound(f"lease {lease} has expired or was revoked")

    def grant_lease(self, ttl_seconds: int) -> int:
        if ttl_seconds < MIN_LEASE_TTL:
            raise ValueError("a lease TTL must be at least 1 second")
        self._reap_if_due()
        with self._write_txn() as conn:
            cur = conn.execute(
                "INSERT INTO leases (ttl, expires_at) VALUES (?, ?)",
                (ttl_seconds, self._now() + ttl_seconds),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def refresh_lease(self, lease_id: int) -> int:
        self._reap_if_due()
        with self._write_txn() as conn:
            self._check_lease(conn, lease_id)
            (ttl,) = conn.execute("SELECT ttl FROM leases WHERE id=?", (lease_id,)).fetchone()
            conn.execute("UPDATE leases SET expires_at=? WHERE id=?", (self._now() + ttl, lease_id))
            return int(ttl)

    def revoke_lease(self, lease_id: int) -> bool:
        self._reap_if_due()
        with self._write_txn() as conn:
            if conn.execute("SELECT 1 FROM leases WHERE id=?", (lease_id,)).fetchone() is None:
                return False
            self._drop_lease(conn, lease_id)
            return True

    def lease_alive(self, lease_id: int) -> bool:
        with self._read_txn() as conn:
            row = conn.execute("SELECT expires_at FROM leases WHERE id=?", (lease_id,)).fetchone()
            return row is not None and row[0] > self._now()

    # -- keys ------------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._read_txn() as conn:
            row = conn.execute(_SELECT_KV + " WHERE key=?", (key_bytes(key),)).fetchone()
        return _kv(row) if row else None

    def snapshot(self, prefix: str) -> Snapshot:
        return self._select(*_prefix_clause(prefix))

    def snapshot_range(self, start: str, end: str) -> Snapshot:
        return self._select("key >= ? AND key < ?", (key_bytes(start), key_bytes(end)))

    def _select(self, where: str, params: tuple[bytes, ...]) -> Snapshot:
        with self._read_txn() as conn:
            rows = conn.execute(f"{_SELECT_KV} WHERE {where} ORDER BY key", params).fetchall()
            rev = self._revision(conn)
        return Snapshot([_kv(r) for r in rows], rev)

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        return self.compare_and_swap(key, value, 0, lease)

    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        return self._write(key, value, expected_mod_revision, lease)

    def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        self._write(key, value, None, lease)

    def _write(self, key: str, value: bytes, expected: int | None, lease: int | None) -> bool:
        self._reap_if_due()
        with self._write_txn() as conn:
            return self._write_in(conn, key_bytes(key), value, expected, lease)

    def _write_in(
        self,
        conn: sqlite3.Connection,
        raw: bytes,
        value: bytes,
        expected: int | None,
        lease: int | None,
    ) -> bool:
        """Write `raw` if its mod_revision is `expected` (0: absent; None: whatever it is)."""
        row = conn.execute(
            "SELECT create_revision, mod_revision FROM kv WHERE key=?", (raw,)
        ).fetchone()
        if expected is not None and (row[1] if row else 0) != expected:
            return False
        self._check_lease(conn, lease)
        rev = self._bump(conn)
        created = row[0] if row else rev
        conn.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
            (raw, value, created, rev, lease),
        )
        conn.execute(
            "INSERT INTO events VALUES (?, ?, 0, ?, ?, ?)", (rev, raw, value, created, lease)
        )
        return True

    def delete(self, key: str, expected_mod_revision: int | None = None) -> bool:
        self._reap_if_due()
        with self._write_txn() as conn:
            return self._delete_in(conn, key_bytes(key), expected_mod_revision)

    def _delete_in(self, conn: sqlite3.Connection, raw: bytes, expected: int | None) -> bool:
        row = conn.execute("SELECT mod_revision FROM kv WHERE key=?", (raw,)).fetchone()
        if row is None or expected not in (None, row[0]):
            return False
        self._delete_row(conn, raw, self._bump(conn))
        return True

    def swap_then_delete(
        self,
        key: str,
        value: bytes,
        expected_mod_revision: int,
        delete_key: str,
        delete_expected: int | None,
        lease: int | None = None,
    ) -> tuple[bool, bool]:
        """One transaction: a node woken by either change reads both."""
        self._reap_if_due()
        with self._write_txn() as conn:
            if not self._write_in(conn, key_bytes(key), value, expected_mod_revision, lease):
                return False, False
            return True, self._delete_in(conn, key_bytes(delete_key), delete_expected)

    @staticmethod
    def _delete_row(conn: sqlite3.Connection, raw: bytes, rev: int) -> None:
        conn.execute("DELETE FROM kv WHERE key=?", (raw,))
        conn.execute("INSERT INTO events VALUES (?, ?, 1, x'', 0, NULL)", (rev, raw))

    # -- watch -----------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        if timeout <= 0:
            return self._events_since(prefix, start_revision, settled=False)[0]
        change = self._change_watch()
        try:
            while True:
                # With inotify, read under the write lock: a commit whose WAL write woke us
                # may not be visible yet (the writer still syncs), and holding the lock waits
                # for it. Its watch was set before this read, so nothing falls in between.
                events, next_expiry = self._events_since(
                    prefix, start_revision, settled=change is not None
                )
                now = time.monotonic()
                if events:
                    self._last_activity = now
                    return events
                remaining = deadline - now
                if remaining <= 0:
                    return events
                if change is not None and not change.broken:
                    # an expiring lease deletes its keys at the next access: be that access
                    if next_expiry is not None:
                        remaining = min(remaining, next_expiry - self._now() + LEASE_MARGIN)
                    change.wait(max(LEASE_MARGIN, remaining))
                else:
                    idle = now - self._last_activity >= ACTIVE_WINDOW
                    poll = max(self._poll, IDLE_POLL) if idle else self._poll
                    self._sleep(min(poll, remaining))
        finally:
            if change is not None:
                change.close()

    def _change_watch(self) -> ChangeWatch | None:
        """A new inotify watch on the database, or None (logged once) to poll instead."""
        try:
            with self._lock:
                if self._interrupt is None:
                    self._interrupt = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    # not in close(): a watch may still be polling it (a reused fd number
                    # would be worse); it goes with the object
                    weakref.finalize(self, os.close, self._interrupt)
            # SQLite follows a symlinked path: its WAL is next to the real file
            return ChangeWatch(Path(os.path.realpath(self.path)), self._interrupt)
        except (OSError, AttributeError) as exc:  # no inotify/eventfd, or out of watches
            if not self._polling_logged:
                log.warning(
                    "datastore_watch_polling",
                    cert_path=str(self.path),
                    reason=f"inotify is unavailable ({exc}); polling every {IDLE_POLL:g}s",
                )
                self._polling_logged = True
            return None

    def _events_since(
        self, prefix: str, start_revision: int, *, settled: bool
    ) -> tuple[list[Event], float | None]:
        """Events from `start_revision` and the next lease expiry (on the injected clock)."""
        where, params = _prefix_clause(prefix)
        if settled:
            self._reap_if_due()
        txn = self._write_txn() if settled else self._read_txn()
        with txn as conn:
            compacted = int(
                conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
            )
            if start_revision <= compacted:
                raise WatchCompacted(
                    f"revision {start_revision} is compacted in {self.path} "
                    f"(history starts at {compacted + 1}); read the keys again",
                    compacted,
                )
            rows = conn.execute(
                f"{_SELECT_EVENTS} WHERE revision >= ? AND {where} ORDER BY revision, key",
                (start_revision, *params),
            ).fetchall()
            (next_expiry,) = conn.execute("SELECT MIN(expires_at) FROM leases").fetchone()
        events = [Event(EventType.DELETE if r[5] else EventType.PUT, _kv(r[:5])) for r in rows]
        return events, next_expiry


_SELECT_KV = "SELECT key, value, create_revision, mod_revision, lease FROM kv"
_SELECT_EVENTS = "SELECT key, value, create_revision, revision, lease, deleted FROM events"


def _prefix_clause(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    """Keys are BLOBs, so SQLite compares them bytewise, exactly as etcd orders keys."""
    start = key_bytes(prefix)
    end = prefix_end(start)
    if end == b"\0":  # empty prefix (or all 0xff): no upper bound
        return "key >= ?", (start,)
    return "key >= ? AND key < ?", (start, end)


def _kv(row: tuple[bytes, bytes, int, int, int | None]) -> KV:
    key, value, create_rev, mod_rev, lease = row
    return KV(key_str(key), bytes(value), int(mod_rev), int(create_rev), lease)


def _create_schema(conn: sqlite3.Connection) -> None:
    # executescript() would COMMIT our BEGIN IMMEDIATE first; run statement by statement.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
