"""The server's one watch for all its agents' long polls (supervisor/watch_hub.py), on a real
SQLite datastore: every change is delivered, under the poll's prefix, from its revision; a poll
the hub cannot answer completely (too old, hub not following) goes to the datastore; many long
polls cost the datastore one watch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.datastore.base import Event
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.plan.rollout import Phase
from rke2certd.rollout import records as rec
from rke2certd.supervisor import wire
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.watch_hub import WatchHub

NOW = datetime(2030, 1, 2, tzinfo=UTC)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "coord.sqlite") as store:
        yield store


def _hub(ds: SQLiteDatastore, **kw: Any) -> WatchHub:
    hub = WatchHub(ds, **kw).start()
    _until(lambda: hub.following)
    return hub


def _until(check: Callable[[], object]) -> None:
    done = threading.Event()
    while not check():
        done.wait(0.01)


def _keys(answer: tuple[list[Event], int] | list[Event] | None) -> list[str]:
    assert answer is not None
    events = answer[0] if isinstance(answer, tuple) else answer
    return [e.kv.key for e in events]


def test_changes_from_a_revision_under_a_prefix(ds: SQLiteDatastore) -> None:
    hub = _hub(ds)
    try:
        start = ds.snapshot(rec.PREFIX).revision + 1
        ds.put(rec.member_key("a1"), b"1")
        ds.put("/elsewhere/x", b"1")
        ds.put(rec.node_key("a1"), b"2")
        _until(lambda: len(_keys(hub.wait(rec.PREFIX, start, 0))) == 2)
        last = ds.snapshot(rec.PREFIX).revision
        assert _keys(hub.wait(rec.PREFIX, start, 5)) == [rec.member_key("a1"), rec.node_key("a1")]
        assert _keys(hub.wait(rec.NODES, start, 5)) == [rec.node_key("a1")]
        later = ds.snapshot(rec.PREFIX).revision + 1
        assert hub.wait(rec.PREFIX, later, 0) == ([], later)  # nothing new: [] after the wait
        assert hub.wait(rec.PREFIX, start, 0) == (hub.wait(rec.PREFIX, start, 0) or ([], 0))
        assert (hub.wait(rec.PREFIX, start, 0) or ([], 0))[1] == last + 1  # looked up to
        # what the datastore's own watch says, the hub says
        assert _keys(hub.wait(rec.PREFIX, start, 0)) == _keys(ds.watch_prefix(rec.PREFIX, start, 0))
    finally:
        hub.stop()


def test_a_poll_from_before_the_hub_goes_to_the_datastore(ds: SQLiteDatastore) -> None:
    ds.put(rec.member_key("early"), b"1")
    early = ds.snapshot(rec.PREFIX).revision
    hub = _hub(ds)
    try:
        assert hub.wait(rec.PREFIX, early, 0) is None
    finally:
        hub.stop()
    assert hub.wait(rec.PREFIX, early + 1, 0) is None  # stopped: not following


def test_trimming_keeps_what_it_holds_complete(ds: SQLiteDatastore) -> None:
    hub = _hub(ds, keep=4)
    try:
        start = ds.snapshot(rec.PREFIX).revision + 1
        for i in range(10):
            ds.put(rec.member_key(f"n{i}"), b"1")
        last = ds.snapshot(rec.PREFIX).revision
        _until(lambda: (got := hub.wait(rec.PREFIX, last, 0)) and len(got[0]) == 1)
        assert hub.wait(rec.PREFIX, start, 0) is None  # trimmed: the datastore answers
        kept = [r for r in range(start, last + 1) if hub.wait(rec.PREFIX, r, 0) is not None]
        first = kept[0]
        assert kept == list(range(first, last + 1)) and len(kept) >= 2
        assert _keys(hub.wait(rec.PREFIX, first, 0)) == _keys(ds.watch_prefix(rec.PREFIX, first, 0))
    finally:
        hub.stop()


def test_many_long_polls_one_datastore_watch(ds: SQLiteDatastore, tmp_path: Path) -> None:
    calls: list[str] = []
    watch = ds.watch_prefix

    def counted(prefix: str, start: int, timeout: float) -> list[Event]:
        calls.append(threading.current_thread().name)
        return watch(prefix, start, timeout)

    ds.watch_prefix = counted  # type: ignore[method-assign]
    hub = _hub(ds)
    api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), hub=hub)
    try:
        start = ds.snapshot(rec.PREFIX).revision + 1
        doc = {
            "op": "watch",
            "prefix": wire.key_out(rec.PREFIX),
            "start_revision": start,
            "timeout": 20,
        }
        answers: list[dict[str, Any]] = []
        polls = [
            threading.Thread(target=lambda i=i: answers.append(api.handle(f"a{i}", doc)))
            for i in range(40)
        ]
        for t in polls:
            t.start()
        _until(lambda: api._watching == 40)
        ds.put(rec.rollout_key("ca-1"), b"{}")
        for t in polls:
            t.join(30)
        assert len(answers) == 40
        got = [[e.kv.key for e in wire.events_in(a["events"])] for a in answers]
        assert got == [[rec.rollout_key("ca-1")]] * 40
        assert {name for name in calls} == {"rke2certd-watch-hub"}  # no poll watched itself
    finally:
        hub.stop()


def test_a_poll_kept_to_some_keys(ds: SQLiteDatastore) -> None:
    """`only`: the changes of those keys alone; others neither end the wait nor come back."""
    hub = _hub(ds)
    try:
        start = ds.snapshot(rec.PREFIX).revision + 1
        ds.put(rec.status_key("ca-1", "a1"), b"1")
        ds.put(rec.status_key("ca-1", "a2"), b"1")
        ds.put(rec.update_key("a2"), b"1")
        last = ds.snapshot(rec.PREFIX).revision
        _until(lambda: _keys(hub.wait(rec.PREFIX, last, 0)))  # the hub has seen them
        only = (rec.status_key("ca-1", "a2"), rec.ROLLOUTS)
        assert _keys(hub.wait(rec.PREFIX, start, 5, only)) == [rec.status_key("ca-1", "a2")]
        assert hub.wait(rec.PREFIX, last + 1, 0, only) == ([], last + 1)
        # none of those keys changed: [] after the wait, and it looked up to the last change
        assert hub.wait(rec.PREFIX, start, 0, (rec.SLOTS,)) == ([], last + 1)
    finally:
        hub.stop()


def test_the_route_says_up_to_where_it_looked(ds: SQLiteDatastore) -> None:
    """An agent whose keys did not change goes on from where the server looked, with the hub
    and without it (the datastore's answer, filtered): never from a revision left behind."""
    start = ds.snapshot(rec.PREFIX).revision + 1
    ds.put(rec.update_key("a1"), b"1")
    ds.put(rec.status_key("ca-1", "a1"), b"1")
    last = ds.snapshot(rec.PREFIX).revision
    doc = {
        "op": "watch",
        "prefix": wire.key_out(rec.PREFIX),
        "start_revision": start,
        "timeout": 0,
        "only": [wire.key_out(rec.SLOTS)],
    }
    plain = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}))
    assert plain.handle("a2", doc) == {"events": [], "revision": last + 1}
    hub = _hub(ds)
    try:
        with_hub = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), hub=hub)
        later = {**doc, "start_revision": last + 1}
        assert with_hub.handle("a2", later) == {"events": [], "revision": last + 1}
        ds.put(rec.slot_key(Phase.AGENT, 0), b"{}")
        answer = with_hub.handle("a2", {**later, "timeout": 5})
        assert [e.kv.key for e in wire.events_in(answer["events"])] == [
            rec.slot_key(Phase.AGENT, 0)
        ]
        assert answer["revision"] == last + 2
    finally:
        hub.stop()


def test_a_change_wakes_only_the_polls_it_concerns(ds: SQLiteDatastore) -> None:
    """Each poll waits on a flag of its own, set by the hub only for a change of its keys:
    a fleet joining (a write per agent) must not wake every other agent's poll on the
    server to look and sleep again."""
    hub = _hub(ds)
    try:
        start = ds.snapshot(rec.PREFIX).revision + 1
        results: dict[str, Any] = {}
        names = [f"a{i}" for i in range(20)]

        def poll(name: str) -> None:
            results[name] = hub.wait(rec.PREFIX, start, 60, (rec.status_key("ca-1", name),))

        threads = {n: threading.Thread(target=poll, args=(n,)) for n in names}
        for t in threads.values():
            t.start()
        _until(lambda: len(hub._polls) == len(names))
        ds.put(rec.update_key("a3"), b"1")  # nobody's keys: wakes nobody
        ds.put(rec.status_key("ca-1", "a7"), b"1")
        threads["a7"].join(30)
        assert _keys(results["a7"]) == [rec.status_key("ca-1", "a7")]
        with hub._lock:
            assert len(hub._polls) == len(names) - 1
            assert not any(p.ready.is_set() for p in hub._polls)  # none was woken for it
        hub.stop()  # a stopping hub wakes them all: they ask the datastore (None)
        for t in threads.values():
            t.join(30)
        assert all(results[n] is None for n in names if n != "a7")
    finally:
        hub.stop()
