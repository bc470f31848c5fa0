"""Which agent a lease granted through a server's endpoint belongs to, kept in the datastore.

An agent's lease must outlive the server that granted it: when that server fails, the agent
goes on with the next one (supervisor/choice.py), refreshing the same lease and writing its
records on it. So the owner is written beside the lease, on the lease itself (it goes when the
lease goes), under a prefix of its own outside /rke2certd/: agents cannot read it, and no
rollout read or watch carries it. Any server then accepts the lease from its owner.

No owner key is thus either a lease that ended (the agent must be told "lease not found" and
take a new one) or a live lease that no agent owns (a server's own: refused); the cluster API
tells them apart with `Datastore.lease_alive`.
"""

from __future__ import annotations

from rke2certd.datastore.base import Datastore

OWNERS = "/rke2certd-leases/"


def owner_key(lease: int) -> str:
    return f"{OWNERS}{lease:x}"


def record(ds: Datastore, lease: int, node: str) -> None:
    ds.put(owner_key(lease), node.encode(), lease)


def owner(ds: Datastore, lease: int) -> str | None:
    kv = ds.get(owner_key(lease))
    return kv.value.decode(errors="replace") if kv is not None else None
