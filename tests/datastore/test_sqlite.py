"""SQLite specifics: several processes on one file, leases on an injected clock, file modes,
history compaction, refusing a file that is not ours, and the watch woken by inotify."""

from __future__ import annotations

import json
import os
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
from tests.harness.wait import HANG, SAFETY, in_background, wait_for

ROOT = Path(__file__).resolve().parents[2]

# One writer process: race for the creation lock, then CAS-increment a counter n times,
# printing which revision each successful increment replaced. Two barriers (files in a
# directory, no clock): all start together, and none goes on past its first increment until
# every process has made one, so every process is writing while the others are.
WRITER = r"""
import json, sys, time
from pathlib import Path
from rke2certd.datastore import SQLiteDatastore

path, n, barriers = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
me, procs = sys.argv[4], int(sys.argv[5])

def barrier(stage):
    (barriers / f"{stage}-{me}").touch()
    while len(list(barriers.glob(f"{stage}-*"))) < procs:
        time.sleep(0.001)

with SQLiteDatastore(path) as ds:
    barrier("start")
    won = ds.create("/lock", me.encode())
    replaced, conflicts, first = [], 0, time.time()
    while len(replaced) < n:
        kv = ds.get("/counter")
        if ds.compare_and_swap("/counter", str(int(kv.value) + 1).encode(), kv.mod_revision):
            replaced.append(kv.mod_revision)
            if len(replaced) == 1:
                barrier("first")
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
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, *map(str, (path, per_proc, barriers, f"p{i}", procs))],
            stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for i in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=SAFETY)
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


def test_expired_leases_are_looked_for_only_when_one_may_have_expired(tmp_path: Path) -> None:
    """Reads and writes between two possible expiries do not query the leases (the look takes
    the store lock every request of a busy server waits for)."""
    clock = FakeClock()
    with SQLiteDatastore(tmp_path / "s.sqlite", clock=clock) as ds:
        lease = ds.grant_lease(10)
        ds.create("/nodes/a", b"a", lease=lease)
        looks: list[str] = []
        ds._conn.set_trace_callback(lambda sql: looks.append(sql) if "leases" in sql else None)
        clock.advance(0.5)
        for _ in range(5):
            assert ds.get("/nodes/a") is not None
            ds.put("/nodes/b", b"b")
        assert looks == []
        clock.advance(0.5)  # a lease granted since the last look may expire from now on
        assert ds.get("/nodes/a") is not None
        assert any("MIN(expires_at)" in sql for sql in looks)


def test_a_lease_granted_elsewhere_is_reaped_at_its_expiry(tmp_path: Path) -> None:
    """Another process's lease (unknown at this one's last look) expires no earlier than the
    minimum TTL after that look: this one's next access after its expiry deletes its keys."""
    clock = FakeClock()
    path = tmp_path / "s.sqlite"
    with SQLiteDatastore(path, clock=clock) as here, SQLiteDatastore(path, clock=clock) as there:
        assert here.get("/nodes/x") is None  # looked: no lease at all
        clock.advance(0.5)
        lease = there.grant_lease(1)
        there.create("/nodes/x", b"x", lease=lease)
        clock.advance(0.7)
        assert here.get("/nodes/x") is not None  # looked again: it expires in 0.3 s
        clock.advance(0.3)
        assert here.get("/nodes/x") is None


def test_a_clock_set_back_looks_for_expired_leases_again(tmp_path: Path) -> None:
    clock = FakeClock()
    with SQLiteDatastore(tmp_path / "s.sqlite", clock=clock) as ds:
        clock.advance(100)
        assert ds.get("/nodes/a") is None  # looked at t+100: next due at t+101
        clock.advance(-99)
        lease = ds.grant_lease(1)
        ds.create("/nodes/a", b"a", lease=lease)
        clock.advance(1)  # t+2: expired, long before t+101
        assert ds.get("/nodes/a") is None


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
        # not before its timeout (a lower bound only: a slow machine makes it later, not sooner)
        assert time.monotonic() - t0 >= 0.8
        assert sleeps == []


def test_a_waiting_watch_sees_a_lease_expire_without_other_access(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with SQLiteDatastore(tmp_path / "s.sqlite", sleep=sleeps.append) as ds:
        lease = ds.grant_lease(1)
        ds.create("/w/node", b"alive", lease=lease)
        start = ds.snapshot("/w/").revision + 1
        # at the expiry, not at the end of the call: only the expiry can end it in time
        events = in_background(lambda: ds.watch_prefix("/w/", start, timeout=HANG)).result()
        assert [(e.type, e.kv.key) for e in events] == [(EventType.DELETE, "/w/node")]
        assert sleeps == []


def test_close_ends_a_waiting_watch(tmp_path: Path) -> None:
    ds = SQLiteDatastore(tmp_path / "s.sqlite")
    start = ds.snapshot("/w/").revision + 1
    before = _inotify_fds()
    watch = in_background(lambda: ds.watch_prefix("/w/", start, timeout=HANG))
    wait_for(lambda: _inotify_fds() > before, "the watch waiting on its inotify instance")
    ds.close()
    with pytest.raises(DatastoreError):  # ended by close(), long before its timeout
        watch.result()


def _inotify_fds() -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if _readlink(fd) == "anon_inode:inotify")


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed since listed
        return ""


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
        events = in_background(lambda: ds.watch_prefix("/w/", start, timeout=HANG)).result()
        timer.join()
    assert [e.kv.key for e in events] == ["/w/k"]
    warned = [e for e in logs if e["event"] == "datastore_watch_polling"]
    assert len(warned) == 1 and "Too many open files" in warned[0]["reason"]
