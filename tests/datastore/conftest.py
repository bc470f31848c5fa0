"""Fixtures for the datastore tests: a test PKI, shared etcd clusters, and `backend`/`store`,
parametrised over the embedded SQLite file, a single TLS etcd and a three-member TLS cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rke2certd.datastore import Datastore, SQLiteDatastore
from tests.datastore.support import Opener, open_etcd
from tests.datastore.tls import EtcdPKI, make_etcd_pki
from tests.harness.etcd import EtcdCluster, EtcdFactory, etcd_factory  # noqa: F401


@pytest.fixture(scope="session")
def etcd_pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPKI:
    return make_etcd_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def etcd_single(etcd_factory: EtcdFactory, etcd_pki: EtcdPKI) -> EtcdCluster:  # noqa: F811
    """One member, TLS with --client-cert-auth."""
    return etcd_factory(1, server_tls=etcd_pki.server)


@pytest.fixture(scope="session")
def etcd_trio(etcd_factory: EtcdFactory, etcd_pki: EtcdPKI) -> EtcdCluster:  # noqa: F811
    """Three members, client and peer TLS with client-cert auth."""
    return etcd_factory(3, server_tls=etcd_pki.server)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("etcd-cluster", marks=pytest.mark.etcd),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path, etcd_pki: EtcdPKI) -> Iterator[Opener]:
    """Opens new clients of one store (as separate nodes or processes would); closes them all."""
    opened: list[Datastore] = []
    if request.param == "sqlite":
        path = tmp_path / "server" / "db" / "test.sqlite"

        def opener() -> Datastore:
            return SQLiteDatastore(path, poll_interval=0.05)
    else:
        name = "etcd_single" if request.param == "etcd" else "etcd_trio"
        cluster: EtcdCluster = request.getfixturevalue(name)

        def opener() -> Datastore:
            return open_etcd(cluster.endpoint, etcd_pki, tmp_path)

    def tracked() -> Datastore:
        opened.append(opener())
        return opened[-1]

    yield tracked
    for store in opened:
        store.close()


@pytest.fixture
def store(backend: Opener) -> Datastore:
    return backend()


@pytest.fixture
def ns() -> str:
    """A key prefix of this test's own: the etcd clusters are shared by the whole session."""
    return f"/test/{uuid.uuid4().hex[:10]}/"
