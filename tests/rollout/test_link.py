"""Which changes wake a node (link.interest, judged again when the interest changes), and the
long-lived etcd watch stream the link reads (datastore/stream.py) on a real three-member TLS etcd
cluster."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from rke2certd.datastore import Datastore, SQLiteDatastore, open_datastore
from rke2certd.datastore import stream as stream_module
from rke2certd.datastore.base import (
    KV,
    DatastoreUnavailable,
    Event,
    EventType,
    OutcomeUnknown,
)
from rke2certd.datastore.stream import WatchStream
from rke2certd.plan.rollout import (
    PHASES,
    Idle,
    NodeState,
    NodeStatus,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
    Wait,
)
from rke2certd.roles.server import ServerRollout
from rke2certd.rollout import records as rec
from rke2certd.rollout.link import (
    ClusterLink,
    _Feed,
    interest,
    server_filter,
    server_interest,
    server_ranges,
)
from tests.datastore.tls import EtcdPKI
from tests.harness.etcd import EtcdCluster
from tests.harness.wait import HANG, SAFETY, in_background, wait_for

T0 = datetime(2030, 1, 1, tzinfo=UTC)
R = Rollout("ca-1", RolloutKind.CA, "g", PHASES, None, RolloutState.ACTIVE, "", T0, "e1")


def put(key: str, value: bytes = b"{}", created: int = 5, modified: int = 5) -> Event:
    return Event(EventType.PUT, KV(key, value, modified, created))


def status(node: str, state: NodeState) -> Event:
    return put(rec.status_key("ca-1", node), rec.encode_status(NodeStatus(node, state)))


def test_a_barrier_waiter_wakes_when_its_blocker_is_done() -> None:
    wake = interest(Wait(R, "waiting", "e1", "barrier"), Phase.CONTROL_PLANE)
    assert not wake(status("e1", NodeState.APPLIED))
    assert wake(status("e1", NodeState.DONE))
    assert wake(status("e1", NodeState.FAILED))
    assert not wake(status("e2", NodeState.DONE))  # someone else's progress
    assert not wake(status("e10", NodeState.DONE))  # e1's key is a prefix of e10's
    assert not wake(put(rec.slot_key(Phase.ETCD, 0)))


def test_a_barrier_waiter_wakes_once_when_the_last_node_it_waits_for_is_done() -> None:
    # Not at each etcd node's done: with P nodes before it and Q after, that was P * Q reads.
    wait = Wait(R, "waiting", "e1", "barrier", pending=("e1", "e2", "e3"))
    wake = interest(wait, Phase.CONTROL_PLANE)
    assert not wake(status("e2", NodeState.DONE))
    assert not wake(status("e1", NodeState.APPLIED))
    assert not wake(status("e1", NodeState.DONE))
    assert not wake(status("e1", NodeState.DONE))  # the same one again does not count twice
    assert wake(status("e3", NodeState.FAILED))  # the last one: the barrier opens (or stops)
    wake = interest(wait, Phase.CONTROL_PLANE)
    assert wake(put(rec.status_key("ca-1", "e2"), b"not json"))  # unreadable: read and say so
    assert wake(put(rec.rollout_key("ca-1")))  # resumed, stopped: every waiter hears it


def test_a_change_judged_under_the_previous_interest_is_judged_again(tmp_path: Path) -> None:
    """The main loop reads, decides, then sets the interest of its new step; a change that came
    in between was judged by the interest of the step before. It must wake the node if the new
    interest wants it, or the node would sleep until RECHECK."""
    woken: list[int] = []
    with SQLiteDatastore(tmp_path / "db.sqlite", poll_interval=0.01) as ds:
        link = ClusterLink(lambda: ds, 15, rec.node_key("c1"), lambda: woken.append(1))
        read = ds.snapshot(rec.PREFIX).revision  # what the step below is decided on
        link.set_interest(interest(Idle(), Phase.CONTROL_PLANE), read)  # the step before
        ds.create(rec.status_key("ca-1", "e1"), rec.encode_status(NodeStatus("e1", NodeState.DONE)))
        link._follow(ds, _Feed(None, revision=read + 1))  # the watch thread: not for an idle node
        assert not link.take_changed() and not woken

        barrier = Wait(R, "waiting", "e1", "barrier", pending=("e1",))
        link.set_interest(interest(barrier, Phase.CONTROL_PLANE), read + 1)  # read after it
        assert not link.take_changed()
        link.set_interest(interest(barrier, Phase.CONTROL_PLANE), read)  # read before it
        assert link.take_changed() and woken


def test_a_queue_waiter_wakes_when_the_node_ahead_moves() -> None:
    wake = interest(Wait(R, "waiting", "c3", "queue"), Phase.CONTROL_PLANE)
    assert wake(status("c3", NodeState.DONE))
    assert not wake(status("c4", NodeState.DONE))
    assert not wake(status("c30", NodeState.DONE))  # c3's key is a prefix of c30's
    # it took a slot (a restart writes no status): the next in line moves up
    taken = rec.encode_slot(Slot(Phase.CONTROL_PLANE, 1, "c3", "ca-1"))
    assert wake(put(rec.slot_key(Phase.CONTROL_PLANE, 1), taken))
    other = rec.encode_slot(Slot(Phase.CONTROL_PLANE, 0, "c2", "ca-1"))
    assert not wake(put(rec.slot_key(Phase.CONTROL_PLANE, 0), other))
    assert not wake(Event(EventType.DELETE, KV(rec.slot_key(Phase.CONTROL_PLANE, 0), b"", 9, 0)))
    assert not wake(put(rec.slot_key(Phase.ETCD, 0), taken))


def test_a_queue_waiter_also_wakes_when_the_node_before_its_blocker_reports() -> None:
    """`Wait.then`: its report lets the blocker go; this node reads meanwhile, so that its own
    turn starts from a small change, not a catch-up on the whole line."""
    step = Wait(R, "waiting", "c3", "queue", then="c2")
    wake = interest(step, Phase.CONTROL_PLANE)
    assert wake(status("c2", NodeState.DONE)) and wake(status("c3", NodeState.DONE))
    assert not wake(status("c1", NodeState.DONE))
    assert not wake(status("c20", NodeState.DONE))  # c2's key is a prefix of c20's
    only = server_filter(step, Phase.CONTROL_PLANE)
    assert only is not None
    assert rec.status_key(R.id, "c2") in only and rec.status_key(R.id, "c3") in only


def test_the_next_in_line_wakes_for_slots_of_its_phase() -> None:
    wake = interest(Wait(R, "waiting", "c1", "slot"), Phase.CONTROL_PLANE)
    assert wake(Event(EventType.DELETE, KV(rec.slot_key(Phase.CONTROL_PLANE, 0), b"", 9, 0)))
    assert not wake(put(rec.slot_key(Phase.ETCD, 0)))


def test_an_idle_agent_wakes_for_rollout_records_only() -> None:
    """Nodes coming and going concern no idle node: a fleet starting would otherwise have
    every agent read the whole cluster at every arrival."""
    wake = interest(Idle(), Phase.AGENT)
    assert wake(put(rec.rollout_key("ca-2")))
    assert not wake(put(rec.node_key("x")))
    assert not wake(Event(EventType.DELETE, KV(rec.node_key("x"), b"", 9, 0)))
    assert not wake(put(rec.member_key("x")))
    assert not wake(status("e1", NodeState.DONE))
    assert not wake(put(rec.slot_key(Phase.AGENT, 0)))


def test_everyone_waiting_wakes_for_nodes_coming_and_going_members_and_rollouts() -> None:
    wake = interest(Wait(R, "waiting", "c1", "slot"), Phase.CONTROL_PLANE)
    assert wake(put(rec.node_key("x")))  # registered (created)
    assert not wake(put(rec.node_key("x"), created=5, modified=9))  # its updates
    assert wake(Event(EventType.DELETE, KV(rec.node_key("x"), b"", 9, 0)))
    assert wake(put(rec.member_key("x")))
    assert wake(put(rec.rollout_key("ca-2")))
    assert not wake(status("e1", NodeState.DONE))


# -- the etcd watch stream ---------------------------------------------------------------------


def _delete(etcd: EtcdCluster, pki: EtcdPKI, tmp_path: Path, key: str) -> None:
    """From a timer thread, with a client of its own; a lost answer is settled by reading."""
    c = pki.client
    with open_datastore(
        etcd.endpoint, data_dir=tmp_path, cafile=c.ca, certfile=c.cert, keyfile=c.key
    ) as ds:
        for _ in range(5):
            with contextlib.suppress(OutcomeUnknown):
                ds.delete(key)
            if ds.get(key) is None:
                return


def _session(pki: EtcdPKI) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = str(pki.client.ca)
    s.cert = (str(pki.client.cert), str(pki.client.key))
    return s


@pytest.mark.etcd
def test_stream_follows_fails_over_and_closes(
    etcd3: EtcdCluster, rollout_pki: EtcdPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = rollout_pki.client
    ds = open_datastore(
        etcd3.endpoint, data_dir=tmp_path, cafile=c.ca, certfile=c.cert, keyfile=c.key
    )
    start = ds.snapshot("/w/").revision + 1
    ds.create("/w/a", b"1")
    ds.create("/other", b"x")
    stream = WatchStream(etcd3.endpoints, _session(rollout_pki), "/w/", "/w0")
    batches = stream.batches(start)
    first = next(batches)  # history from `start`, then live changes
    assert [(e.type, e.kv.key, e.kv.value) for e in first] == [(EventType.PUT, "/w/a", b"1")]
    _delete(etcd3, rollout_pki, tmp_path, "/w/a")  # the open stream carries it to the next read
    [deleted] = next(batches)
    assert deleted.type is EventType.DELETE and deleted.kv.key == "/w/a"
    last = deleted.kv.mod_revision

    etcd3.kill(0)  # the member the stream reads from
    with pytest.raises(DatastoreUnavailable):
        next(batches)
    ds.create("/w/b", b"2")
    [again] = next(stream.batches(last + 1))  # from the next revision, on another member
    assert again.kv.key == "/w/b"

    # A quiet stream would wait HANG seconds: only close() can end the read in time.
    monkeypatch.setattr(stream_module, "IDLE_TIMEOUT", HANG)
    live = stream.batches(again.kv.mod_revision + 1)
    reading = in_background(lambda: next(live))
    wait_for(lambda: stream._resp is not None, "the stream to be open and read")
    stream.close()
    with pytest.raises(Exception):  # noqa: B017 (whatever the closed socket raises)
        reading.result()
    etcd3.restart(0)
    ds.close()


# -- what reaches a server: the structural keys and its own wake key ---------------------------


def test_a_server_wakes_for_its_wake_key_and_the_structural_keys_only() -> None:
    wake = server_interest(rec.wake_key("c1"))
    assert wake(put(rec.wake_key("c1")))
    assert not wake(Event(EventType.DELETE, KV(rec.wake_key("c1"), b"", 9, 0)))  # lease expiry
    assert not wake(put(rec.wake_key("c10")))  # c1's key is a prefix of c10's
    assert wake(put(rec.node_key("x"))) and not wake(put(rec.node_key("x"), created=5, modified=9))
    assert wake(Event(EventType.DELETE, KV(rec.node_key("x"), b"", 9, 0)))
    assert wake(put(rec.member_key("x"))) and wake(put(rec.rollout_key("ca-2")))
    for busy in (
        rec.status_key("ca-1", "e1"),
        rec.slot_key(Phase.ETCD, 0),
        rec.update_key("e1"),
        rec.wake_key("c2"),
    ):
        assert not wake(put(busy)), busy
    # the etcd streams carry exactly these ranges
    (start, end), (own, own_end) = server_ranges(rec.wake_key("c1"))
    assert (start, end) == (rec.STRUCTURE, rec.STRUCTURE_END)
    assert start <= rec.MEMBERS and rec.node_key("zz") < end and rec.rollout_key("zz") < end
    assert not (start <= rec.SLOTS < end) and not (start <= rec.STATUSES < end)
    assert not (start <= rec.UPDATES < end) and not (start <= rec.WAKE < end)
    assert own <= rec.wake_key("c1") < own_end and not (own <= rec.wake_key("c10") < own_end)


def test_an_idle_server_is_not_woken_by_arrivals_a_waiting_one_is() -> None:
    """A fleet starting writes a registration and a membership per agent: an idle server
    reads the whole fleet at none of them (it would at each, for every agent: quadratic).
    A node going, a membership removed and the rollout records wake it all the same."""
    idle = server_interest(rec.wake_key("c1"), arrivals=False)
    assert not idle(put(rec.node_key("a1"))) and not idle(put(rec.member_key("a1")))
    assert idle(Event(EventType.DELETE, KV(rec.node_key("a1"), b"", 9, 0)))
    assert idle(Event(EventType.DELETE, KV(rec.member_key("a1"), b"", 9, 0)))
    assert idle(put(rec.rollout_key("ca-2"))) and idle(put(rec.wake_key("c1")))
    assert not idle(put(rec.status_key("ca-1", "e1")))
    # the step says which: ServerRollout.follow on a real (unstarted) link
    own = rec.wake_key("c1")
    link = ClusterLink(lambda: SQLiteDatastore(":memory:"), 15, rec.node_key("c1"), lambda: None)
    role = SimpleNamespace(node=SimpleNamespace(cfg=SimpleNamespace(node="c1")))
    arrival = put(rec.node_key("a2"), created=20, modified=20)
    ServerRollout.follow(role, link, Idle(), Phase.CONTROL_PLANE, 10)  # type: ignore[arg-type]
    assert not link.interest(arrival) and link.interest(put(own))
    waiting = Wait(R, "waiting for etcd node e1: not running", "e1", "down")
    ServerRollout.follow(role, link, waiting, Phase.CONTROL_PLANE, 10)  # type: ignore[arg-type]
    assert link.interest(arrival) and link.interest(put(rec.member_key("a2")))


def test_a_new_interest_rewinds_only_a_watch_kept_to_keys() -> None:
    """A poll kept to the old keys may have let pass what the new step waits for: the next one
    looks again from the step's read. An unfiltered watch (a server's, at each tick) delivered
    every change already: it goes on where it was, with no read of the same changes again."""
    link = ClusterLink(lambda: SQLiteDatastore(":memory:"), 15, rec.node_key("c1"), lambda: None)
    link.set_interest(server_interest(rec.wake_key("c1"), arrivals=False), 10)
    assert link._rewind is None
    agent = ClusterLink(lambda: SQLiteDatastore(":memory:"), 15, rec.node_key("a1"), lambda: None)
    agent.set_interest(lambda _e: True, 10, (rec.ROLLOUTS,))
    assert agent._rewind is None  # its polls so far were not kept to any keys
    agent.set_interest(lambda _e: True, 12, (rec.SLOTS,))
    assert agent._rewind == 13


def test_an_idle_sqlite_server_sleeps_through_a_fleet_joining(tmp_path: Path) -> None:
    woken = threading.Event()
    with SQLiteDatastore(tmp_path / "db.sqlite", poll_interval=0.01) as ds:
        own = rec.wake_key("c1")
        link = ClusterLink(lambda: ds, 15, rec.node_key("c1"), woken.set, (), server_interest(own))
        link.start(ds.grant_lease(15))
        try:
            assert woken.wait(SAFETY) and link.take_changed()  # the first read
            link.set_interest(server_interest(own, arrivals=False), ds.snapshot("/").revision)
            woken.clear()
            lease = ds.grant_lease(15)
            for i in range(20):
                ds.create(rec.node_key(f"a{i}"), b"{}", lease)
                ds.create(rec.member_key(f"a{i}"), b"{}")
            assert not woken.wait(1.0) and not link.take_changed()
            ds.revoke_lease(lease)  # the fleet's registrations go: record them down
            assert woken.wait(SAFETY) and link.take_changed()
        finally:
            link.stop()


def test_a_sqlite_server_link_is_woken_by_its_wake_key_not_by_busy_keys(tmp_path: Path) -> None:
    """SQLite wakes every process at any write: the link's filter keeps the main loop asleep
    for the busy keys, as etcd's ranges do."""
    woken = threading.Event()
    with SQLiteDatastore(tmp_path / "db.sqlite", poll_interval=0.01) as ds:
        own = rec.wake_key("c1")
        link = ClusterLink(lambda: ds, 15, rec.node_key("c1"), woken.set, (), server_interest(own))
        link.start(ds.grant_lease(15))
        try:
            assert woken.wait(SAFETY) and link.take_changed()  # the first read
            woken.clear()
            ds.create(rec.status_key("ca-1", "e1"), b"{}")
            ds.create(rec.slot_key(Phase.ETCD, 0), b"{}")
            ds.put(rec.wake_key("c2"), b"{}")
            assert not woken.wait(1.0) and not link.take_changed()
            ds.put(own, rec.encode_wake("e1", "ca-1", T0))
            assert woken.wait(SAFETY) and link.take_changed()
        finally:
            link.stop()


@pytest.mark.etcd
def test_an_etcd_server_link_hears_only_the_structural_keys_and_its_wake_key(
    etcd3: EtcdCluster, rollout_pki: EtcdPKI, tmp_path: Path
) -> None:
    """etcd filters: a status, slot or update write, or another node's wake-up, reaches no
    stream of this node; its own wake key and the structural keys do, on two fixed streams."""
    c = rollout_pki.client

    def open_ds() -> Datastore:
        return open_datastore(
            etcd3.endpoint, data_dir=tmp_path, cafile=c.ca, certfile=c.cert, keyfile=c.key
        )

    ds, woken = open_ds(), threading.Event()
    own = rec.wake_key("c1")
    session = _session(rollout_pki)
    streams = [WatchStream(etcd3.endpoints, session, k, e) for k, e in server_ranges(own)]
    link = ClusterLink(open_ds, 15, rec.node_key("c1"), woken.set, streams, server_interest(own))
    link.start(ds.grant_lease(15))
    try:
        assert woken.wait(SAFETY) and link.take_changed()  # the first read
        wait_for(lambda: all(s._resp is not None for s in streams), "both streams open")
        woken.clear()
        ds.create(rec.status_key("ca-1", "e2"), rec.encode_status(NodeStatus("e2", NodeState.DONE)))
        ds.create(rec.slot_key(Phase.ETCD, 0), rec.encode_slot(Slot(Phase.ETCD, 0, "e3", "ca-1")))
        ds.create(rec.update_key("e3"), b"{}")
        ds.put(rec.wake_key("c10"), b"{}")
        ds.put(own, rec.encode_wake("e2", "ca-1", T0))
        assert woken.wait(SAFETY) and link.take_changed()
        woken.clear()
        ds.create(rec.rollout_key("ca-2"), b"{}")  # structural: every node hears it
        assert woken.wait(SAFETY)
        time.sleep(0.3)
        heard = {e.kv.key for e in link._recent}
        assert heard == {own, rec.rollout_key("ca-2")}
    finally:
        link.stop()
        ds.close()


def test_one_failing_stream_is_not_hidden_by_another_that_works(tmp_path: Path) -> None:
    """A server has a lease thread and two watch streams: each keeps its own failure until it
    works again, so the status line does not say "restored" while one is still failing."""
    with SQLiteDatastore(tmp_path / "db.sqlite") as ds:
        link = ClusterLink(lambda: ds, 15, rec.node_key("c1"), lambda: None)
        link._stop.set()  # no pauses between retries here
        assert link.error is None
        link._failed("watch-1", DatastoreUnavailable("etcd member 2 refused the stream"), 0.0)
        link._ok("watch-0")
        link._ok("lease")
        assert link.error == "etcd member 2 refused the stream"
        link._failed("lease", DatastoreUnavailable("no leader"), 0.0)
        link._ok("watch-1")
        assert link.error == "no leader"
        link._ok("lease")
        assert link.error is None


def test_the_server_filter_holds_what_an_agent_waits_for() -> None:
    """server_filter (the keys a server keeps an agent's long poll to) lets through every change
    `interest` wakes for (but the slot the node ahead takes: its report is enough)."""
    samples = [
        put(rec.rollout_key("ca-2")),
        put(rec.node_key("x")),
        put(rec.member_key("x")),
        status("c3", NodeState.DONE),
        status("c1", NodeState.DONE),
        status("a7", NodeState.DONE),
        put(rec.slot_key(Phase.CONTROL_PLANE, 0)),
        put(rec.update_key("x")),
        put(rec.wake_key("x")),
    ]
    steps = [
        Idle(),
        Wait(R, "waiting", "c1", "barrier", pending=("c1", "c3")),
        Wait(R, "waiting", "c3", "queue"),
        Wait(R, "waiting", "c3", "queue", then="c1"),
        Wait(R, "waiting", "c1", "slot"),
        Wait(R, "waiting", "c3", "down"),
    ]
    for step in steps:
        only = server_filter(step, Phase.CONTROL_PLANE)
        assert only is not None
        wake = interest(step, Phase.CONTROL_PLANE)
        for event in samples:
            queued = isinstance(step, Wait) and step.on == "queue"
            queue_slot = queued and event.kv.key.startswith(rec.SLOTS)
            if wake(event) and not queue_slot:
                assert event.kv.key.startswith(only), (step, event.kv.key)
        assert not put(rec.update_key("x")).kv.key.startswith(only)  # nobody's business
    assert server_filter(Idle(), Phase.AGENT) == (rec.ROLLOUTS,)


def test_a_link_without_a_lease_thread_keeps_its_lease_when_called(tmp_path: Path) -> None:
    """A process that runs many agents keeps their leases with one timer: `keep_alive` does
    what the lease thread does once, and says when to call it again."""
    woken: list[int] = []
    fail = False
    with SQLiteDatastore(tmp_path / "db.sqlite", poll_interval=0.01) as ds:

        def open_ds() -> Datastore:
            if fail:
                raise DatastoreUnavailable("no server answered")
            return ds

        link = ClusterLink(
            open_ds, 15, rec.node_key("a1"), lambda: woken.append(1), lease_thread=False
        )
        link.start(ds.grant_lease(15))
        try:
            assert [t.name for t in link._threads] == ["rke2certd-watch"]  # no lease thread
            first = link.lease
            assert link.keep_alive() == 5.0 and link.lease == first and link.error is None
            assert first is not None and ds.revoke_lease(first)
            assert link.keep_alive() == 5.0  # lost: a new lease, and the main loop told
            assert link.lease != first and link.lease is not None
            assert ds.lease_alive(link.lease) and woken
            link._lease_ds, fail = None, True
            assert [link.keep_alive() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
            assert link.error == "no server answered"
            fail = False
            assert link.keep_alive() == 5.0 and link.error is None
        finally:
            link.stop()
        assert link.stopped and link.keep_alive() == 5.0
