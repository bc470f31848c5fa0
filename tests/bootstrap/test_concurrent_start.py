"""Servers that start together on one datastore agree on one CA set.

Each server has its own data dir and the same token; their `rke2certd renew` processes are
released at the same instant. With three etcd members, the member every server talks to first
is killed while the CA set is being created: the servers fail over and still agree.
"""

from __future__ import annotations

import pytest

from rke2certd.datastore import Datastore, open_datastore

from .support import (
    CA_FILES,
    Backend,
    LockWatcher,
    bootstrap_key,
    ca_set,
    openssl_verify_leaves,
    renew_in_process,
    run_together,
)

TOKEN = "K10::server:concurrent-start-secret"
PASSWORD = "concurrent-start-secret"


@pytest.mark.parametrize("servers", [2, 3])
def test_servers_starting_together_end_with_identical_cas_and_one_bootstrap_key(
    fault_backend: Backend, servers: int
) -> None:
    backend = fault_backend
    backend.shared = True  # SQLite: one file for every server (the default is per node)
    watcher = None
    if backend.kind == "etcd3":
        assert backend.cluster is not None
        leader = backend.cluster.leader()
        victim = next(i for i in range(3) if i != leader)
        # Every server lists the victim first, so each must fail over when it dies.
        backend.endpoint_order = [victim, *(i for i in range(3) if i != victim)]
        survivor = backend.endpoint_order[1]

        def kill() -> None:
            assert backend.cluster is not None
            backend.cluster.kill(victim)

        def open_survivor() -> Datastore:
            assert backend.cluster is not None and backend.tls is not None
            return open_datastore(
                backend.cluster.client_url(survivor),
                data_dir=backend.root,
                cafile=backend.tls.client.ca,
                certfile=backend.tls.client.cert,
                keyfile=backend.tls.client.key,
            )

        watcher = LockWatcher(open_survivor, kill, at_most=0.5)

    nodes = [backend.node(f"server-{i}", token=TOKEN) for i in range(servers)]
    results = run_together(
        [["-c", cfg, "renew"] for cfg, _ in nodes],
        on_go=watcher.start if watcher else None,
    )
    if watcher is not None:
        watcher.join()
        assert backend.cluster is not None
        assert sum(m.running for m in backend.cluster.members) == 2
    for res in results:
        assert res.returncode == 0, res.stderr
    # exactly one of them created the CA set; the others waited for it and extracted it
    creators = [r for r in results if "create the self-signed CA set" in r.stdout]
    assert len(creators) == 1, [r.stdout for r in results]

    first = ca_set(nodes[0][1])
    assert all(first[rel] for rel in CA_FILES), "a CA file is missing or empty"
    for _, data in nodes[1:]:
        assert ca_set(data) == first
    values = backend.bootstrap_values()
    assert list(values) == [bootstrap_key(PASSWORD)], values
    assert values[bootstrap_key(PASSWORD)]  # the complete value, not the creation lock

    # A server joining later extracts the same CAs.
    cfg, data = backend.node("server-late", token=TOKEN)
    result = renew_in_process(cfg)
    assert not result.created_cas
    assert ca_set(data) == first
    assert list(backend.bootstrap_values()) == [bootstrap_key(PASSWORD)]
    for _, node_data in [*nodes, (cfg, data)]:
        openssl_verify_leaves(node_data)
