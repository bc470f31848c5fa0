"""The Datastore contract, run against the SQLite file, one TLS etcd, and a 3-member TLS cluster."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rke2certd.datastore import Datastore, EventType, LeaseNotFound
from rke2certd.datastore.codec import (
    BOOTSTRAP_FIELDS,
    BootstrapFile,
    bootstrap_key_name,
    decode_bootstrap,
    decrypt,
    encode_bootstrap,
    encrypt,
    passphrase_from_token,
)
from tests.datastore.support import Opener
from tests.harness.wait import HANG, in_background, wait_for


def test_get_missing_and_create(store: Datastore, ns: str) -> None:
    assert store.get(ns + "a") is None
    assert store.create(ns + "a", b"1")
    kv = store.get(ns + "a")
    assert kv is not None and kv.value == b"1" and kv.lease is None
    assert kv.create_revision == kv.mod_revision > 0
    assert not store.create(ns + "a", b"2")
    assert store.get(ns + "a") == kv


def test_creation_lock_exactly_one_of_many_wins(backend: Opener, ns: str) -> None:
    """Eight separate clients (nodes) race to create the empty-value creation lock."""
    clients = [backend() for _ in range(8)]
    barrier = threading.Barrier(len(clients))

    def attempt(ds: Datastore) -> bool:
        barrier.wait()
        return ds.create(ns + "lock", b"")

    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(attempt, clients))
    assert results.count(True) == 1
    lock = clients[0].get(ns + "lock")
    assert lock is not None and lock.value == b""


def test_cas_conflict(backend: Opener, ns: str) -> None:
    a, b = backend(), backend()
    assert a.create(ns + "k", b"v0")
    seen = a.get(ns + "k")
    assert seen is not None and b.get(ns + "k") == seen
    assert a.compare_and_swap(ns + "k", b"from-a", seen.mod_revision)
    assert not b.compare_and_swap(ns + "k", b"from-b", seen.mod_revision)  # stale revision
    now = b.get(ns + "k")
    assert now is not None and now.value == b"from-a"
    assert now.mod_revision > seen.mod_revision and now.create_revision == seen.create_revision
    assert not b.compare_and_swap(ns + "k", b"x", 0)  # 0 means "absent"
    assert b.compare_and_swap(ns + "k", b"from-b", now.mod_revision)


def test_swap_then_delete_deletes_only_after_a_swap(store: Datastore, ns: str) -> None:
    assert store.create(ns + "status", b"applied") and store.create(ns + "slot", b"held")
    status, slot = store.get(ns + "status"), store.get(ns + "slot")
    assert status is not None and slot is not None
    # the swap fails: nothing changes, the delete is not tried
    assert store.swap_then_delete(ns + "status", b"done", 1, ns + "slot", None) == (False, False)
    assert store.get(ns + "status") == status and store.get(ns + "slot") == slot
    # the swap goes through, the delete's compare fails: the swap stays
    got = store.swap_then_delete(ns + "status", b"done", status.mod_revision, ns + "slot", 1)
    assert got == (True, False)
    assert store.get(ns + "slot") == slot
    status = store.get(ns + "status")
    assert status is not None and status.value == b"done"
    # both
    got = store.swap_then_delete(
        ns + "status", b"done again", status.mod_revision, ns + "slot", slot.mod_revision
    )
    assert got == (True, True) and store.get(ns + "slot") is None
    after = store.get(ns + "status")
    assert after is not None and after.value == b"done again"


def test_create_then_snapshot_reads_after_the_create(backend: Opener, ns: str) -> None:
    a, b = backend(), backend()
    assert b.create(ns + "slot/1", b"other")
    created, snap = a.create_then_snapshot(ns + "slot/0", b"mine", None, ns + "slot/")
    assert created and [(kv.key, kv.value) for kv in snap.kvs] == [
        (ns + "slot/0", b"mine"),
        (ns + "slot/1", b"other"),
    ]
    created, snap = b.create_then_snapshot(ns + "slot/0", b"late", None, ns + "slot/")
    assert not created and snap.kvs[0].value == b"mine"
    assert snap.revision >= snap.kvs[1].mod_revision


def test_cas_on_absent_key_with_zero(store: Datastore, ns: str) -> None:
    assert not store.compare_and_swap(ns + "new", b"x", 5)
    assert store.compare_and_swap(ns + "new", b"x", 0)


def test_revisions_increase_store_wide(store: Datastore, ns: str) -> None:
    revs = []
    for i in range(5):
        store.create(f"{ns}k{i}", b"x")
        kv = store.get(f"{ns}k{i}")
        assert kv is not None
        revs.append(kv.mod_revision)
    assert revs == sorted(set(revs))
    assert store.snapshot(ns).revision >= revs[-1]


def test_delete(store: Datastore, ns: str) -> None:
    assert not store.delete(ns + "none")
    store.create(ns + "k", b"x")
    kv = store.get(ns + "k")
    assert kv is not None
    assert not store.delete(ns + "k", kv.mod_revision + 100)
    assert store.get(ns + "k") is not None
    assert store.delete(ns + "k", kv.mod_revision)
    assert store.get(ns + "k") is None
    store.create(ns + "k", b"y")
    assert store.delete(ns + "k")
    assert store.get(ns + "k") is None


def test_snapshot_is_sorted_and_bounded_by_prefix(store: Datastore, ns: str) -> None:
    for key in ("b", "a", "c/d"):
        store.create(ns + key, key.encode())
    store.create(ns[:-1] + "x", b"outside")  # shares the prefix's text but not its slash
    snap = store.snapshot(ns)
    assert [kv.key for kv in snap.kvs] == [ns + "a", ns + "b", ns + "c/d"]
    assert store.get_prefix(ns + "c/") == [kv for kv in snap.kvs if kv.key.endswith("c/d")]


def test_snapshot_range_is_sorted_and_bounded(store: Datastore, ns: str) -> None:
    for k in ("a/1", "b/1", "b/2", "c/1", "d"):
        store.create(ns + k, k.encode())
    snap = store.snapshot_range(ns + "b/", ns + "d")
    assert [kv.key for kv in snap.kvs] == [ns + "b/1", ns + "b/2", ns + "c/1"]
    assert snap.revision >= max(kv.mod_revision for kv in snap.kvs)
    assert store.snapshot_range(ns + "x", ns + "y").kvs == []


def test_binary_values_and_unicode_keys(store: Datastore, ns: str) -> None:
    value = bytes(range(256)) * 4
    assert store.create(ns + "clé/ü", value)
    kv = store.get(ns + "clé/ü")
    assert kv is not None and kv.value == value and kv.key == ns + "clé/ü"


def test_watch_returns_on_change(backend: Opener, ns: str) -> None:
    watcher, writer = backend(), backend()
    start = watcher.snapshot(ns).revision + 1
    # Only the write can end a watch of HANG seconds in time; whether it comes before or
    # while the watch waits, the watch returns it.
    watch = in_background(lambda: watcher.watch_prefix(ns, start, timeout=HANG))
    writer.create(ns + "w", b"hello")
    events = watch.result()
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [(EventType.PUT, ns + "w", b"hello")]


def test_watch_times_out_without_change(store: Datastore, ns: str) -> None:
    store.create(ns[:-1] + "-sibling", b"not under the prefix")
    start = store.snapshot(ns).revision + 1
    t0 = time.monotonic()
    assert store.watch_prefix(ns, start, timeout=0.6) == []
    # waited (a lower bound only: a slow machine makes it later, never sooner)
    assert time.monotonic() - t0 >= 0.5


def test_watch_returns_history_at_once(store: Datastore, ns: str) -> None:
    start = store.snapshot(ns).revision + 1
    store.create(ns + "h", b"1")
    kv = store.get(ns + "h")
    assert kv is not None
    store.compare_and_swap(ns + "h", b"2", kv.mod_revision)
    store.delete(ns + "h")
    # at once: only returning without waiting ends a watch of HANG seconds in time
    events = in_background(lambda: store.watch_prefix(ns, start, timeout=HANG)).result()
    assert [(e.type, e.kv.value) for e in events] == [
        (EventType.PUT, b"1"),
        (EventType.PUT, b"2"),
        (EventType.DELETE, b""),
    ]
    revs = [e.kv.mod_revision for e in events]
    assert revs == sorted(revs) and revs[0] >= start


def test_lease_expiry_deletes_keys(store: Datastore, ns: str) -> None:
    lease = store.grant_lease(1)
    assert store.create(ns + "node", b"alive", lease=lease)
    kv = store.get(ns + "node")
    assert kv is not None and kv.lease == lease
    start = store.snapshot(ns).revision + 1
    wait_for(lambda: store.get(ns + "node") is None, "the lease to expire")
    with pytest.raises(LeaseNotFound):
        store.refresh_lease(lease)
    events = store.watch_prefix(ns, start, timeout=2)
    assert [(e.type, e.kv.key) for e in events] == [(EventType.DELETE, ns + "node")]


def test_lease_refresh_keeps_keys_and_revoke_deletes(store: Datastore, ns: str) -> None:
    # Real time must pass here (etcd's leases run on its own clock): refreshed every 0.2 s
    # for 2.5 s, longer than the 2 s TTL. A refresh could come too late only if this process
    # were not scheduled for 1.8 s.
    lease = store.grant_lease(2)
    store.create(ns + "node", b"alive", lease=lease)
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        time.sleep(0.2)
        assert store.refresh_lease(lease) >= 1
    assert store.get(ns + "node") is not None
    assert store.revoke_lease(lease)
    assert store.get(ns + "node") is None
    assert not store.revoke_lease(lease)


def test_lease_alive_tells_a_live_lease_from_an_ended_one(store: Datastore, ns: str) -> None:
    """Alive while granted (and asking does not refresh it); not alive once it expired, was
    revoked, or for an id never granted. A key that was on the lease is gone in each case."""
    held, short = store.grant_lease(30), store.grant_lease(1)
    store.create(ns + "held", b"x", lease=held)
    store.create(ns + "short", b"x", lease=short)
    assert store.lease_alive(held) and store.lease_alive(short)
    wait_for(lambda: not store.lease_alive(short), "the 1 s lease to expire")
    assert store.get(ns + "short") is None
    assert store.lease_alive(held) and store.get(ns + "held") is not None
    assert store.revoke_lease(held)
    assert not store.lease_alive(held)
    assert not store.lease_alive(0x7FFF_FFFF_0000_0001)  # never granted


def test_write_with_ended_lease_is_refused(store: Datastore, ns: str) -> None:
    lease = store.grant_lease(5)
    store.revoke_lease(lease)
    with pytest.raises(LeaseNotFound):
        store.create(ns + "k", b"x", lease=lease)
    assert store.get(ns + "k") is None


def test_cas_without_lease_detaches_it(store: Datastore, ns: str) -> None:
    lease = store.grant_lease(30)
    store.create(ns + "k", b"x", lease=lease)
    kv = store.get(ns + "k")
    assert kv is not None
    assert store.compare_and_swap(ns + "k", b"y", kv.mod_revision)
    store.revoke_lease(lease)
    kv = store.get(ns + "k")
    assert kv is not None and kv.value == b"y" and kv.lease is None


def test_put_writes_whatever_the_key_holds(store: Datastore, ns: str) -> None:
    """A blind write (wake-up marks): creates, overwrites, sets or detaches the lease, and a
    watcher sees each write, even of the same value."""
    start = store.snapshot(ns).revision + 1
    store.put(ns + "w", b"1")
    first = store.get(ns + "w")
    assert first is not None and first.value == b"1" and first.lease is None
    lease = store.grant_lease(30)
    store.put(ns + "w", b"1", lease)
    again = store.get(ns + "w")
    assert again is not None and again.lease == lease
    assert (
        again.mod_revision > first.mod_revision and again.create_revision == first.create_revision
    )
    events = store.watch_prefix(ns, start, 2.0)
    assert [(e.type, e.kv.value) for e in events] == [(EventType.PUT, b"1")] * 2
    store.revoke_lease(lease)
    assert store.get(ns + "w") is None  # on the writer's lease: gone with it


def test_put_with_ended_lease_is_refused(store: Datastore, ns: str) -> None:
    lease = store.grant_lease(30)
    store.revoke_lease(lease)
    with pytest.raises(LeaseNotFound):
        store.put(ns + "w", b"1", lease)
    assert store.get(ns + "w") is None


def test_bootstrap_creation_lock_then_data(backend: Opener, ns: str) -> None:
    """How servers use the store: the first takes the empty-value lock, then fills it in;
    another server, with the same token, reads and decrypts what the first saved."""
    first, second = backend(), backend()
    passphrase = passphrase_from_token("K10" + "ab" * 32 + "::server:cluster-pw")
    key = ns + bootstrap_key_name(passphrase).lstrip("/")
    assert first.create(key, b"")
    assert not second.create(key, b"")
    lock = second.get(key)
    assert lock is not None and lock.value == b""

    files = {
        name: BootstrapFile.from_unix_ns(1_700_000_000_123_456_789, f"{name}\n".encode())
        for name in BOOTSTRAP_FIELDS
    }
    assert first.compare_and_swap(
        key, encrypt(passphrase, encode_bootstrap(files)), lock.mod_revision
    )
    saved = second.get(key)
    assert saved is not None
    assert decode_bootstrap(decrypt(passphrase, saved.value)) == files
