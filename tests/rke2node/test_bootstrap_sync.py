"""Nothing RKE2's reconcile refuses: every CA file rke2certd writes is the bootstrap key's
content with the field's Timestamp as mtime (as RKE2 writes them), and a rotation goes to the
bootstrap key first, by compare-and-swap over the value it was checked against, every other
field kept byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.bootstrap_write import save_rotation
from rke2certd.commands.renew import renew
from rke2certd.config import load_config
from rke2certd.datastore.codec import BOOTSTRAP_FIELDS, BootstrapFile, bootstrap_key_name
from rke2certd.errors import DatastoreError
from rke2certd.files.lock import node_lock
from rke2certd.node.bootstrap_data import load_value, plan_extract, save_value
from rke2certd.node.node import Node
from rke2certd.pki.join_token import ca_hash
from tests.harness.etcd import EtcdCluster

from .conftest import CRED_FILES, Rke2Node, etcd_client, make_rke2_node, wipe

pytestmark = [pytest.mark.etcd, pytest.mark.slow]  # daemons beside RKE2 stand-ins


def _stored(node: Rke2Node, cluster: EtcdCluster) -> dict[str, BootstrapFile]:
    with etcd_client(cluster, node.data) as ds:
        kv = ds.get(bootstrap_key_name(node.token))
        assert kv is not None
        return load_value(node.token, kv.value)


def _assert_disk_is_the_key(node: Rke2Node, stored: dict[str, BootstrapFile]) -> None:
    for name, rel in BOOTSTRAP_FIELDS.items():
        path = node.layout.server / rel
        assert path.read_bytes() == stored[name].content, rel
        assert path.stat().st_mtime_ns == stored[name].unix_ns, f"{rel}: mtime != Timestamp"
    plan = plan_extract(node.layout, stored)  # what RKE2's reconcile would do at its start
    assert (plan.conflicts, plan.writes) == ([], {})


@pytest.fixture
def node(tmp_path: Path, seed: Path, etcd_https: EtcdCluster) -> Rke2Node:
    wipe(etcd_https, seed)
    n = make_rke2_node(tmp_path / "n", seed=seed, health_etcd_endpoint=etcd_https.client_url(0))
    with etcd_client(etcd_https, n.data) as ds:
        # a field rke2certd does not know (a later RKE2): kept through every rotation
        n.started(ds)
        key = bootstrap_key_name(n.token)
        kv = ds.get(key)
        assert kv is not None
        files = load_value(n.token, kv.value)
        files["SomeLaterField"] = BootstrapFile(datetime(2026, 1, 2, tzinfo=UTC), b"later\n")
        assert ds.compare_and_swap(key, save_value(n.token, files), kv.mod_revision)
    return n


def test_a_rotation_goes_to_the_key_first_and_to_disk_with_its_timestamps(
    node: Rke2Node, etcd_https: EtcdCluster, tmp_path: Path
) -> None:
    before = _stored(node, etcd_https)
    staged = tmp_path / "staged"
    res = node.cli("ca", "stage-rotation", "--out", staged)
    assert res.returncode == 0, res.stderr
    rotate = node.cli("certificate", "rotate-ca", "--path", staged)
    assert rotate.returncode == 0, rotate.stderr
    after = _stored(node, etcd_https)
    for name, rel in BOOTSTRAP_FIELDS.items():
        if rel.startswith("tls/"):  # the CAs and service.key: the staged set
            assert after[name].content == (staged / rel).read_bytes(), rel
            assert after[name].timestamp > before[name].timestamp, rel
    for name in ("PasswdFile", "IPSECKey", "EncryptionConfig", "EncryptionHash"):
        assert after[name] == before[name], f"{name} kept, Timestamp included"
    assert after["SomeLaterField"] == before["SomeLaterField"]
    assert after["PasswdFile"].content == CRED_FILES["cred/passwd"]
    res = node.cli("renew")  # the node takes the rotation: files = key, mtimes = Timestamps
    assert res.returncode == 0, res.stderr
    _assert_disk_is_the_key(node, after)
    again = node.cli("renew")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_restored_tls_dir_carries_the_stored_timestamps(
    node: Rke2Node, etcd_https: EtcdCluster
) -> None:
    stored = _stored(node, etcd_https)
    for rel in BOOTSTRAP_FIELDS.values():
        if not rel.startswith("tls/etcd/"):  # those open the etcd: they stay
            (node.layout.server / rel).unlink()
    res = node.cli("renew")
    assert res.returncode == 0, res.stderr
    _assert_disk_is_the_key(node, stored)


def test_a_rotation_checked_against_an_older_key_is_never_saved(
    node: Rke2Node, etcd_https: EtcdCluster
) -> None:
    """Another server (or `rke2 certificate rotate-ca`) saved a rotation after ours was
    checked: ours must not replace it, whatever it changes."""
    key = bootstrap_key_name(node.token)
    with etcd_client(etcd_https, node.data) as ds:
        checked = ds.get(key)
        assert checked is not None
        files = load_value(node.token, checked.value)
        files["ServerCA"] = BootstrapFile(datetime.now(UTC), b"the other rotation\n")
        assert ds.compare_and_swap(key, save_value(node.token, files), checked.mod_revision)
        newer = ds.get(key)
        with pytest.raises(DatastoreError, match="changed in the datastore while"):
            save_rotation(ds, node.token, {"ClientCA": b"ours\n"}, datetime.now(UTC), checked)
        assert ds.get(key) == newer


class _RotatedOnSecondRead:
    """The real etcd client, with one interleaving forced: a rotation saved by someone else
    (upstream's `rotate-ca`) lands right after rke2certd's first read of the bootstrap key,
    before it writes to disk. No real run hits that moment on demand, hence the wrapper."""

    def __init__(self, ds: Any, key: str, rotated: bytes) -> None:
        self.ds, self.key, self.rotated, self.reads = ds, key, rotated, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)

    def get(self, key: str) -> Any:
        if key == self.key:
            self.reads += 1
            if self.reads == 2:
                kv = self.ds.get(key)
                assert self.ds.compare_and_swap(key, self.rotated, kv.mod_revision)
        return self.ds.get(key)


def test_an_older_ca_set_is_never_written_over_a_newer_one(
    node: Rke2Node, etcd_https: EtcdCluster
) -> None:
    key = bootstrap_key_name(node.token)
    for rel in BOOTSTRAP_FIELDS.values():
        if not rel.startswith("tls/etcd/"):
            (node.layout.server / rel).unlink()  # everything is to be written from the key
    newer = _stored(node, etcd_https)
    newer["ServerCA"] = BootstrapFile(datetime.now(UTC), newer["ServerCA"].content + b"\n")
    loaded = Node.from_config(load_config(node.config))
    with etcd_client(etcd_https, node.data) as ds, node_lock(node.data, 30):
        racing = _RotatedOnSecondRead(ds, key, save_value(node.token, newer))
        renew(loaded, datetime.now(UTC), datastore=racing)
        assert racing.reads >= 3, "the key was read again after the rotation"
    _assert_disk_is_the_key(node, _stored(node, etcd_https))
    assert (node.layout.tls / "server-ca.crt").read_bytes() == newer["ServerCA"].content


@pytest.mark.parametrize("agent_token", ["link", "own", "none"])
def test_tokens_after_a_rotation_stay_as_rke2_keeps_them(
    node: Rke2Node, etcd_https: EtcdCluster, tmp_path: Path, agent_token: str
) -> None:
    """`server/token` gets the new CA hash; `agent-token`, RKE2's link to `token`, stays a
    link; a separate agent token keeps its own password; a missing one is left to RKE2."""
    server = node.layout.server
    agent = server / "agent-token"
    if agent_token == "link":
        agent.symlink_to("token")
    elif agent_token == "own":
        agent.write_text("K10" + "0" * 64 + "::node:separate-agent-pw\n")
    staged = tmp_path / "staged"
    assert node.cli("ca", "stage-rotation", "--out", staged).returncode == 0
    assert node.cli("certificate", "rotate-ca", "--path", staged).returncode == 0
    res = node.cli("renew")
    assert res.returncode == 0, res.stderr
    new_hash = ca_hash((staged / "tls" / "server-ca.crt").read_bytes())
    assert (server / "token").read_text() == f"K10{new_hash}::server:{node.token}\n"
    if agent_token == "link":
        assert agent.is_symlink() and agent.read_text() == (server / "token").read_text()
    elif agent_token == "own":
        assert agent.read_text() == f"K10{new_hash}::node:separate-agent-pw\n"
    else:
        assert not agent.exists()
