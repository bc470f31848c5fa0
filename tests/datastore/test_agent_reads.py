"""An agent's planning read through a server (supervisor/mirror.py, cluster_api.py's `since`)
on each kind of store: SQLite answers from its history; etcd, which has none to offer in one
query, answers with the keys that changed and the names of all. Either way every read equals a
direct read of the store, writes, deletions and re-creations included, and the updates (which
no rule reads) are never sent."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rke2certd.datastore import Datastore, SQLiteDatastore
from rke2certd.datastore.base import Snapshot
from rke2certd.rollout import records as rec
from rke2certd.supervisor import wire
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.mirror import Mirror

NOW = datetime(2030, 1, 2, tzinfo=UTC)


def _rows(snap: Snapshot) -> list[tuple[str, bytes, int]]:
    return [(kv.key, kv.value, kv.mod_revision) for kv in snap.kvs]


def test_an_agents_read_is_the_changes_on_every_store(store: Datastore, ns: str) -> None:
    tag = ns.strip("/").replace("/", "-")  # the etcd clusters are shared: names of our own
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA(None, {}))
    mirror = Mirror(*rec.PLANNING)
    written = [rec.node_key(f"{tag}-{i}") for i in range(20)]
    written += [rec.update_key(f"{tag}-{i}") for i in range(20)]
    try:
        for key in written:
            store.put(key, b"x" * 50)

        def read() -> dict[str, Any]:
            answer = api.handle("agent", mirror.request())
            assert _rows(mirror.take(answer)) == _rows(store.snapshot_range(*rec.PLANNING))
            return answer

        assert "snapshot" in read()  # the first read is whole
        store.put(written[1], b"changed")
        store.delete(written[2])
        store.delete(written[3])
        store.put(written[3], b"created again")  # a new revision: sent as changed
        written.append(rec.status_key("r1", f"{tag}-0"))
        store.put(written[-1], b"new")
        store.put(rec.update_key(f"{tag}-5"), b"an update: not sent")
        answer = read()
        if isinstance(store, SQLiteDatastore):  # from its history
            sent = [wire.key_in(e["kv"]["key"]) for e in answer["delta"]]
            assert sent == [written[1], written[2], written[3], written[3], written[-1]]
        else:
            sent = [wire.key_in(kv["key"]) for kv in answer["changed"]["kvs"]]
            assert sorted(sent) == sorted([written[1], written[3], written[-1]])
            assert written[2] not in set(wire.keys_in(answer["keys"]))
            assert rec.update_key(f"{tag}-5") not in set(wire.keys_in(answer["keys"]))
        read()  # nothing changed: the same keys
    finally:
        for key in written:
            store.delete(key)
