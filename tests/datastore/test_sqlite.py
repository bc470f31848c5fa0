"""SQLite specifics: several processes on one file, leases on an injected clock, file modes,
history compaction, and refusing a file that is not ours."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.datastore import (
    DatastoreUnavailable,
    EventType,
    LeaseNotFound,
    SQLiteDatastore,
    WatchCompacted,
)
from rke2certd.errors import DatastoreError

ROOT = Path(__file__).resolve().parents[2]

# One writer process: race for the creation lock, then CAS-increment a counter n times,
# printing which revision each successful increment replaced.
WRITER = r"""
import json, sys, time
from pathlib import Path
from rke2certd.datastore import SQLiteDatastore

path, n, start_at, me = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with SQLiteDatastore(path) as ds:
    time.sleep(max(0.0, start_at - time.time()))  # all processes start writing together
    won = ds.create("/lock", me.encode())
    replaced, conflicts, first = [], 0, time.time()
    while len(replaced) < n:
        kv = ds.get("/counter")
        if ds.compare_and_swap("/counter", str(int(kv.value) + 1).encode(), kv.mod_revision):
            replaced.append(kv.mod_revision)
            time.sleep(0.002)  # let the others in: SQLite's busy backoff favours the holder
        else:
            conflicts += 1
window = [first, time.time()]
print(json.dumps({"won": won, "replaced": replaced, "conflicts": conflicts, "window": window}))
"""


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    path = tmp_path / "db" / "shared.sqlite"
    with SQLiteDatastore(path) as ds:
        ds.create("/counter", b"0")
    procs, per_proc = 4, 100
    start_at = time.time() + 1.0  # after every interpreter has started
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(per_proc), str(start_at), f"p{i}"],
            stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for i in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        results.append(json.loads(out))
    print("CAS conflicts per process:", [r["conflicts"] for r in results])
    # the processes really wrote at the same time: every window overlaps every other
    assert max(r["window"][0] for r in results) < min(r["window"][1] for r in results)
    assert sum(r["won"] for r in results) == 1  # exactly one process took the creation lock
    replaced = [rev for r in results for rev in r["replaced"]]
    assert len(replaced) == len(set(replaced)) == procs * per_proc  # no update was lost
    with SQLiteDatastore(path) as ds:
        counter = ds.get("/counter")
        assert counter is not None and counter.value == str(procs * per_proc).encode()
        lock = ds.get("/lock")
        winner = next(f"p{i}" for i, r in enumerate(results) if r["won"])
        assert lock is not None and lock.value == winner.encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_lease_expiry_on_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    with SQLiteDatastore(tmp_path / "s.sqlite", clock=clock) as ds:
        lease = ds.grant_lease(10)
        ds.create("/nodes/a", b"a", lease=lease)
        ds.create("/nodes/b", b"b")
        start = ds.snapshot("/").revision + 1
        clock.advance(9)
        assert ds.get("/nodes/a") is not None
        assert ds.refresh_lease(lease) == 10
        clock.advance(9.5)
        assert ds.get("/nodes/a") is not None  # refreshed 9.5 s ago
        clock.advance(0.5)
        assert ds.get("/nodes/a") is None  # deleted on this access
        assert [kv.key for kv in ds.get_prefix("/nodes/")] == ["/nodes/b"]
        with pytest.raises(LeaseNotFound):
            ds.refresh_lease(lease)
        (event,) = ds.watch_prefix("/nodes/", start, timeout=0)
        assert event.type is EventType.DELETE and event.kv.key == "/nodes/a"


def test_file_and_directory_modes(tmp_path: Path) -> None:
    path = tmp_path / "data" / "server" / "db" / "rke2certd.sqlite"
    with SQLiteDatastore(path) as ds:
        ds.create("/k", b"v")
        for p in path.parent.glob("rke2certd.sqlite*"):  # the db, -wal and -shm
            assert p.stat().st_mode & 0o777 == 0o600, p
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert path.parent.parent.stat().st_mode & 0o777 == 0o700


def test_wal_mode_and_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with SQLiteDatastore(path) as ds:
        ds.create("/k", b"v")
        rev = ds.snapshot("/").revision
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    with SQLiteDatastore(path) as ds:
        kv = ds.get("/k")
        assert kv is not None and kv.value == b"v"
        assert ds.snapshot("/").revision == rev


def test_old_history_is_compacted(tmp_path: Path) -> None:
    with SQLiteDatastore(tmp_path / "s.sqlite", history=10) as ds:
        for i in range(30):
            ds.create(f"/k{i}", b"x")
        head = ds.snapshot("/").revision
        with pytest.raises(WatchCompacted) as err:
            ds.watch_prefix("/", 2, timeout=0)
        assert err.value.compact_revision >= head - 11
        events = ds.watch_prefix("/", head - 5, timeout=0)
        assert [e.kv.mod_revision for e in events] == list(range(head - 5, head + 1))


def test_refuses_a_kine_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kine (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(DatastoreError, match="kine database"):
        SQLiteDatastore(path)
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("kine",)]  # nothing was added to it


def test_busy_past_the_timeout_is_a_retryable_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with SQLiteDatastore(path, busy_timeout=0.2) as ds:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process keeps the write lock
        try:
            with pytest.raises(DatastoreUnavailable, match="is busy"):
                ds.create("/k", b"v")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert ds.create("/k", b"v")  # nothing was left half-done
