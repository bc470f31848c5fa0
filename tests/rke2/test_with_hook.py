"""rke2certd's package on RKE2 nodes: the stand-in (tests/harness/rke2) runs the package's
`ExecStartPre=` before every start, as systemd does, and refuses to start when it fails; then
its own start reconciles disk against the bootstrap key as RKE2 does (the 3 s rule). rke2certd
gets only an empty config of its own: everything comes from RKE2's config and unit.

Run: python3 -m pytest -q -p no:cacheprovider tests/rke2/test_with_hook.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.node import RKE2Server
from tests.rke2.conftest import Cluster

pytestmark = pytest.mark.etcd

CA_FILES = [bs.FIELDS[f] for f in bs.CA_FIELDS]


def _cas(node: RKE2Server) -> dict[str, bytes]:
    return {rel: (node.server_dir / rel).read_bytes() for rel in CA_FILES}


def _mtimes(node: RKE2Server) -> dict[Path, int]:
    """Every file under the data dir but the stand-in's own run files and etcd's data."""
    out = {}
    for p in node.data_dir.rglob("*"):
        if p.is_file() and "standin" not in p.parts and "db" not in p.parts:
            out[p] = p.stat().st_mtime_ns
    return out


def _hooks_passed(node: RKE2Server) -> None:
    assert node.hook_runs, "the hook never ran"
    for res in node.hook_runs:
        assert res.returncode == 0, res.stderr


def test_fresh_single_server_and_a_second_start_that_writes_nothing(cluster: Cluster) -> None:
    s1 = cluster.server("s1", token="single-secret")
    s1.start()  # the hook runs first, on an empty node: it must neither fail nor make a CA
    _hooks_passed(s1)
    assert s1.last_written == []
    assert len(s1.last_certs) == 13  # RKE2 made every leaf itself, after its own CAs
    s1.stop()
    before = _mtimes(s1)
    s1.start()  # hook + RKE2's reconcile; nothing to do
    _hooks_passed(s1)
    assert s1.last_certs == {} and s1.last_written == []
    after = _mtimes(s1)
    changed = sorted(str(p) for p in before if after.get(p) != before[p])
    assert changed == [], changed


@pytest.mark.slow
def test_fresh_three_server_cluster_joins_through_server_bootstrap(cluster: Cluster) -> None:
    s1 = cluster.server("s1", token="three-secret")
    s1.start()
    joiners = [cluster.server(n, join=s1) for n in ("s2", "s3")]
    for node in joiners:
        node.start()  # the hook passes before the node has joined (no CA, no etcd member yet)
        _hooks_passed(node)
        assert _cas(node) == _cas(s1)
    assert {m["name"] for m in s1.etcd_members()} == {"s1", "s2", "s3"}
    for node in [s1, *joiners]:  # every restart: hook, then RKE2's reconcile, both pass
        node.restart()
        _hooks_passed(node)
        assert node.last_written == [] and node.last_certs == {}, node.name


@pytest.mark.slow
def test_etcd_only_and_control_plane_only_nodes(cluster: Cluster) -> None:
    s1 = cluster.server("s1", token="kinds-secret")
    s1.start()
    etcd_only = cluster.server(
        "e1",
        join=s1,
        disable_apiserver=True,
        disable_controller_manager=True,
        disable_scheduler=True,
    )
    cp_only = cluster.server("c1", join=s1, disable_etcd=True)
    for node in (etcd_only, cp_only):
        node.start()
        _hooks_passed(node)
        assert _cas(node) == _cas(s1)
    assert not (cp_only.tls / "etcd/server-client.crt").exists()
    for node in (etcd_only, cp_only):
        node.restart()
        _hooks_passed(node)
        assert node.last_written == [] and node.last_certs == {}, node.name


@pytest.mark.slow
def test_etcd_down_at_a_nodes_start(cluster: Cluster) -> None:
    """RKE2 down on every server: the etcd is down too. The hook must let RKE2 start."""
    s1 = cluster.server("s1", token="down-secret")
    s1.start()
    s2 = cluster.server("s2", join=s1)
    s2.start()
    s1.stop()
    s2.stop()
    s2.start()  # no etcd answers while the hook runs (s2's own member is down with RKE2)
    _hooks_passed(s2)
    assert s2.last_written == [] and s2.last_certs == {}
    s1.start()  # its etcd brings back quorum
    _hooks_passed(s1)
    assert {m["name"] for m in s2.etcd_members()} == {"s1", "s2"}
