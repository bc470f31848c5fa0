"""SQLite specifics: several processes on one file, leases on an injected clock, file modes,
history compaction, refusing a file that is not ours, and the watch woken by inotify."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rke2certd.datastore import (
    DatastoreUnavailable,
    EventType,
    LeaseNotFound,
    SQLiteDatastore,
    WatchCompacted,
)
from rke2certd.datastore import sqlite as sqlite_module
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


# --- the watch: woken by inotify, not by polling -------------------------------------------------

ONE_WRITE = r"""
import sys
from pathlib import Path
from rke2certd.datastore import SQLiteDatastore

with SQLiteDatastore(Path(sys.argv[1])) as ds:
    ds.create("/w/" + sys.argv[2], b"from another process")
"""


def test_a_write_by_another_process_wakes_a_waiting_watch(tmp_path: Path) -> None:
    path = tmp_path / "db" / "s.sqlite"
    sleeps: list[float] = []
    # polling every 30 s: only inotify can see the write within the bound below
    with SQLiteDatastore(path, poll_interval=30.0, sleep=sleeps.append) as ds:
        ds.create("/other/x", b"before")
        start = ds.snapshot("/w/").revision + 1
        writer = subprocess.Popen(
            [sys.executable, "-c", ONE_WRITE, str(path), "k"],
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        try:
            events = ds.watch_prefix("/w/", start, timeout=20)
        finally:
            assert writer.wait(timeout=60) == 0
        # returned with the write (not at the 20 s timeout), and never slept to poll
        assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
            (EventType.PUT, "/w/k", b"from another process")
        ]
        assert sleeps == []


def test_a_watch_waits_without_polling_and_times_out(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with SQLiteDatastore(tmp_path / "s.sqlite", sleep=sleeps.append) as ds:
        start = ds.snapshot("/w/").revision + 1
        ds.create("/other/x", b"a change elsewhere wakes it; it reads and waits on")
        t0 = time.monotonic()
        assert ds.watch_prefix("/w/", start + 1, timeout=0.8) == []
        assert 0.7 < time.monotonic() - t0 < 2
        assert sleeps == []


def test_a_waiting_watch_sees_a_lease_expire_without_other_access(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with SQLiteDatastore(tmp_path / "s.sqlite", sleep=sleeps.append) as ds:
        lease = ds.grant_lease(1)
        ds.create("/w/node", b"alive", lease=lease)
        start = ds.snapshot("/w/").revision + 1
        t0 = time.monotonic()
        events = ds.watch_prefix("/w/", start, timeout=10)
        assert time.monotonic() - t0 < 2.5  # at the expiry, not at the end of the call
        assert [(e.type, e.kv.key) for e in events] == [(EventType.DELETE, "/w/node")]
        assert sleeps == []


def test_close_ends_a_waiting_watch(tmp_path: Path) -> None:
    ds = SQLiteDatastore(tmp_path / "s.sqlite")
    start = ds.snapshot("/w/").revision + 1
    outcome: list[BaseException | list[object]] = []

    def watch() -> None:
        try:
            outcome.append(list(ds.watch_prefix("/w/", start, timeout=30)))
        except DatastoreError as exc:
            outcome.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    ds.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1
    assert len(outcome) == 1 and isinstance(outcome[0], DatastoreError)


def test_without_inotify_a_watch_polls_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: running out of inotify instances for real would need a system-wide limit changed
    # under every other process of the machine.
    def no_inotify(*_args: object) -> None:
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(sqlite_module, "ChangeWatch", no_inotify)
    path = tmp_path / "s.sqlite"
    with (
        capture_logs() as logs,
        SQLiteDatastore(path, poll_interval=0.05) as ds,
        SQLiteDatastore(path) as writer,
    ):
        start = ds.snapshot("/w/").revision + 1
        assert ds.watch_prefix("/w/", start, timeout=0.3) == []
        timer = threading.Timer(0.3, lambda: writer.create("/w/k", b"v"))
        timer.start()
        events = ds.watch_prefix("/w/", start, timeout=10)
        timer.join()
    assert [e.kv.key for e in events] == ["/w/k"]
    warned = [e for e in logs if e["event"] == "datastore_watch_polling"]
    assert len(warned) == 1 and "Too many open files" in warned[0]["reason"]
