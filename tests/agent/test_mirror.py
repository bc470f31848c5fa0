"""An agent's whole read of the coordination keys as the changes since its last one
(supervisor/mirror.py, the `since` read of cluster_api.py): through a real endpoint on a real
SQLite store, every read equals a direct read of the store, writes, deletes and expired leases
included; and the answers carry the changes, not the fleet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.agent import node_password
from rke2certd.commands.agent_rollout import trusted_bundle
from rke2certd.datastore.base import Snapshot
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.rollout import records as rec
from rke2certd.supervisor import wire
from rke2certd.supervisor.cluster_api import ClusterAPI, ClusterRefused, ServedCA
from rke2certd.supervisor.mirror import Mirror
from rke2certd.supervisor.remote import RemoteDatastore

from .helpers import ServerNode, renew_agent, start_cluster_endpoint

NOW = datetime(2030, 1, 2, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> datetime:
        return NOW + timedelta(seconds=self.t)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "coord.sqlite", clock=clock) as ds:
        yield ds


def _same(a: Snapshot, b: Snapshot) -> None:
    assert [(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in a.kvs] == [
        (kv.key, kv.value, kv.mod_revision, kv.lease) for kv in b.kvs
    ]


def test_reads_are_the_changes_since_and_equal_the_store(
    server: ServerNode,
    store: SQLiteDatastore,
    clock: FakeClock,
    agent_factory: Callable[..., Any],
) -> None:
    handle = start_cluster_endpoint(server, store)
    try:
        node = agent_factory("agent-1", supervisor_port=handle.port)
        renew_agent(node)
        remote = RemoteDatastore(
            [handle.url],
            lambda: server.agent_token,
            lambda: trusted_bundle(node),
            "agent-1",
            node_password=lambda: node_password(node),
        )
        answers: list[dict[str, Any]] = []
        call = remote._call

        def spy(doc: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
            answer = call(doc, timeout)
            answers.append(answer)
            return answer

        remote._call = spy  # type: ignore[method-assign]
        planning = rec.PLANNING
        for i in range(50):  # a fleet's records, some on a lease
            store.put(rec.PREFIX + f"nodes/n{i}", b"x" * 100)
            store.put(rec.update_key(f"n{i}"), b"u" * 100)
        lease = store.grant_lease(10)
        store.put(rec.PREFIX + "nodes/leased", b"on a lease", lease)
        _same(remote.snapshot_range(*planning), store.snapshot_range(*planning))
        assert "snapshot" in answers[-1]  # the first read is whole, without the updates
        assert len(answers[-1]["snapshot"]["kvs"]) == 51

        store.put(rec.PREFIX + "nodes/n3", b"changed")
        store.delete(rec.PREFIX + "nodes/n4")
        store.put(rec.PREFIX + "rollouts/r1", b"new")
        store.put(rec.update_key("n5"), b"not planned with: not sent")
        store.put(rec.wake_key("n6"), b"past the end: not sent")
        store.put("/elsewhere/k", b"not under the prefix")
        _same(remote.snapshot_range(*planning), store.snapshot_range(*planning))
        assert [e["kv"]["key"] for e in answers[-1]["delta"]] == [
            wire.key_out(rec.PREFIX + k) for k in ("nodes/n3", "nodes/n4", "rollouts/r1")
        ]
        revision = answers[-1]["revision"]

        snap = remote.snapshot_range(*planning)  # nothing changed: nothing sent
        assert answers[-1]["delta"] == [] and snap.revision >= revision

        clock.t += 11  # the lease expires: its key goes at the server's next read
        _same(remote.snapshot_range(*planning), store.snapshot_range(*planning))
        keys = {kv.key for kv in remote.snapshot_range(*planning).kvs}
        assert rec.PREFIX + "nodes/leased" not in keys

        other = remote.snapshot(rec.ROLLOUTS)  # another prefix: a whole read, as ever
        assert "snapshot" in answers[-1] and [kv.key for kv in other.kvs] == [
            rec.PREFIX + "rollouts/r1"
        ]
        everything = remote.snapshot(rec.PREFIX)  # `rke2certd status`: all of it, whole
        assert "snapshot" in answers[-1]
        _same(everything, store.snapshot(rec.PREFIX))
    finally:
        handle.stop()


def test_history_gone_means_a_whole_read(tmp_path: Path, clock: FakeClock) -> None:
    """A store whose history was pruned past the agent's revision answers the whole keys."""
    with SQLiteDatastore(tmp_path / "c.sqlite", clock=clock, history=20) as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}))
        mirror = Mirror(rec.PREFIX)
        ds.put(rec.PREFIX + "a", b"1")
        mirror.take(api.handle("n", mirror.request()))
        for i in range(100):
            ds.put(rec.PREFIX + f"b{i % 5}", str(i).encode())
        answer = api.handle("n", mirror.request())
        assert "snapshot" in answer
        _same(mirror.take(answer), ds.snapshot(rec.PREFIX))


def test_history_gone_with_few_changes_means_the_changed_keys(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Past its history, a store answers the keys newer than the agent's read and the names of
    all: a key held and not named was deleted. Nearly all keys changed: the whole keys."""
    with SQLiteDatastore(tmp_path / "c.sqlite", clock=clock, history=20) as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}))
        mirror = Mirror(*rec.PLANNING)
        for i in range(40):
            ds.put(rec.node_key(f"n{i}"), b"x")
        mirror.take(api.handle("n", mirror.request()))
        for i in range(30):  # past the history, on keys that are not planned with
            ds.put(rec.update_key(f"n{i % 3}"), str(i).encode())
        ds.put(rec.node_key("n1"), b"changed")
        ds.delete(rec.node_key("n2"))
        answer = api.handle("n", mirror.request())
        assert "delta" not in answer and "snapshot" not in answer
        assert [e["key"] for e in answer["changed"]["kvs"]] == [wire.key_out(rec.node_key("n1"))]
        assert len(answer["keys"]) == 39
        _same(mirror.take(answer), ds.snapshot_range(*rec.PLANNING))

        for i in range(30):  # nearly all keys changed: the whole keys are about as small
            ds.put(rec.node_key(f"n{i + 3}"), b"again")
        answer = api.handle("n", mirror.request())
        assert "snapshot" in answer
        _same(mirror.take(answer), ds.snapshot_range(*rec.PLANNING))


def test_changed_keys_that_do_not_fit_what_is_held_are_refused() -> None:
    """A name neither changed nor held, or a changed key not named: the answer does not fit
    this agent's read; it forgets what it held (the next read is whole)."""

    def kv(key: str, rev: int) -> dict[str, Any]:
        return {"key": wire.key_out(key), "value": "", "mod_revision": rev, "create_revision": rev}

    held = {"snapshot": {"kvs": [kv(rec.node_key("a"), 2)], "revision": 5}}
    unknown = {"changed": {"kvs": [], "revision": 6}, "keys": [wire.key_out(rec.node_key("b"))]}
    unnamed = {"changed": {"kvs": [kv(rec.node_key("c"), 6)], "revision": 6}, "keys": []}
    older = {"changed": {"kvs": [], "revision": 4}, "keys": [wire.key_out(rec.node_key("a"))]}
    for bad, reason in (
        (unknown, "neither changed nor held"),
        (unnamed, "a changed key that is not named"),
        (older, "older than the keys held"),
    ):
        mirror = Mirror(*rec.PLANNING)
        mirror.take(held)
        with pytest.raises(wire.WireError, match=reason):
            mirror.take(bad)
        assert mirror.revision is None and "since" not in mirror.request()
    mirror = Mirror(*rec.PLANNING)
    mirror.take(held)
    good = {"changed": {"kvs": [], "revision": 7}, "keys": [wire.key_out(rec.node_key("a"))]}
    assert [k.key for k in mirror.take(good).kvs] == [rec.node_key("a")]


def test_a_malformed_delta_forgets_what_was_held() -> None:
    mirror = Mirror(rec.PREFIX)
    mirror.take({"snapshot": {"kvs": [], "revision": 5}})
    kv = {"key": wire.key_out("/other/k"), "value": "", "mod_revision": 6, "create_revision": 6}
    bad = {"delta": [{"type": "PUT", "kv": kv}]}
    with pytest.raises(wire.WireError, match="outside the prefix"):
        mirror.take(bad | {"revision": 6})
    assert mirror.revision is None and "since" not in mirror.request()


def test_an_older_server_that_ignores_end_is_cut_to_the_range() -> None:
    """A server from before `end` answers the whole prefix: the mirror keeps its range."""
    mirror = Mirror(*rec.PLANNING)
    assert mirror.request()["end"] == wire.key_out(rec.UPDATES)

    def kv(key: str, rev: int) -> dict[str, Any]:
        return {"key": wire.key_out(key), "value": "", "mod_revision": rev, "create_revision": rev}

    whole = [kv(rec.node_key("a"), 2), kv(rec.update_key("a"), 3), kv(rec.wake_key("a"), 4)]
    snap = mirror.take({"snapshot": {"kvs": whole, "revision": 4}})
    assert [k.key for k in snap.kvs] == [rec.node_key("a")]
    delta = [{"type": "PUT", "kv": kv(rec.update_key("b"), 5)}]
    delta += [{"type": "PUT", "kv": kv(rec.node_key("b"), 6)}]
    snap = mirror.take({"delta": delta, "revision": 6})
    assert [k.key for k in snap.kvs] == [rec.node_key("a"), rec.node_key("b")]
    assert snap.revision == 6


@pytest.mark.parametrize(
    ("end", "reason"),
    [
        (rec.PREFIX, "end must sort after prefix"),
        ("/rke2certd", "only keys under /rke2certd/ can be read here"),
        ("/rke2certd-node-passwords/", "only keys under /rke2certd/ can be read here"),
        (5, "end"),
    ],
)
def test_a_bad_end_is_refused(tmp_path: Path, clock: FakeClock, end: object, reason: str) -> None:
    with SQLiteDatastore(tmp_path / "c.sqlite", clock=clock) as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}))
        end_out = wire.key_out(end) if isinstance(end, str) else end
        with pytest.raises(ClusterRefused, match=reason) as err:
            api.handle("n", {"op": "snapshot", "prefix": wire.key_out(rec.PREFIX), "end": end_out})
        assert err.value.status in (400, 403)


def test_a_range_read_with_since_skips_changes_past_the_end(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The server's delta for a range: only the changes inside it, whatever else moved."""
    with SQLiteDatastore(tmp_path / "c.sqlite", clock=clock) as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}))
        mirror = Mirror(*rec.PLANNING)
        ds.put(rec.node_key("a"), b"1")
        mirror.take(api.handle("n", mirror.request()))
        for i in range(30):  # a busy fleet's updates: none of them planned with
            ds.put(rec.update_key(f"n{i}"), b"u")
        ds.put(rec.status_key("r1", "a"), b"s")
        answer = api.handle("n", mirror.request())
        assert [e["kv"]["key"] for e in answer["delta"]] == [
            wire.key_out(rec.status_key("r1", "a"))
        ]
        _same(mirror.take(answer), ds.snapshot_range(*rec.PLANNING))
