"""The daemon follows RKE2's bootstrap key: a rotation written there by someone else (upstream's
`rke2 certificate rotate-ca` writes the key directly; or another server) is taken to disk with
its Timestamps and starts the same ordered CA rollout as a set staged on this node."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from rke2certd.datastore.codec import BOOTSTRAP_FIELDS, BootstrapFile, bootstrap_key_name
from rke2certd.node.bootstrap_data import load_value, save_value
from rke2certd.node.ca_material import disk_generation
from rke2certd.pki.layout import Layout
from tests.daemon.support import CapturedLogs, DaemonNode, label_of
from tests.harness.etcd import EtcdCluster

from .conftest import Rke2Node, etcd_client, wipe

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@pytest.fixture(scope="session")
def captured_logs_dir(tmp_path_factory: pytest.TempPathFactory) -> CapturedLogs:
    return CapturedLogs.for_session(tmp_path_factory)


def test_an_external_rotation_is_taken_and_rolled_out(
    tmp_path: Path,
    seed: Path,
    etcd_https: EtcdCluster,
    captured_logs_dir: CapturedLogs,
    request: pytest.FixtureRequest,
) -> None:
    wipe(etcd_https, seed)
    rke2_config = tmp_path / "etc-rke2" / "config.yaml"
    dn = DaemonNode.create(
        tmp_path / "n",
        captured_logs_dir,
        label_of(request),
        rke2_config=str(rke2_config),
        node_ip=["127.0.0.1"],
        health_etcd_endpoint=etcd_https.client_url(0),
        restart_command=["true"],
        health_command=["true"],
        registry_ttl=5,
    )
    token = dn.settings["token"]
    rke2_config.parent.mkdir(mode=0o700)
    rke2_config.write_text(yaml.safe_dump({"token": token}))
    shutil.copytree(seed, dn.data, symlinks=True)
    node = Rke2Node(dn.root, {}, {"data-dir": str(dn.data)}, token)
    with etcd_client(etcd_https, dn.data) as ds:
        node.started(ds)
    staged = dn.stage_rotation("upstream")  # the CA set an operator gives `rke2 ... rotate-ca`
    old_generation = disk_generation(Layout(dn.data))
    with dn.daemon() as d:
        d.notify.expect("READY")
        # upstream's rotate-ca: the staged files saved straight into the bootstrap key
        with etcd_client(etcd_https, dn.data) as ds:
            key = bootstrap_key_name(token)
            kv = ds.get(key)
            assert kv is not None
            files = load_value(token, kv.value)
            now = datetime.now(UTC)
            for name, rel in BOOTSTRAP_FIELDS.items():
                if rel.startswith("tls/"):
                    files[name] = BootstrapFile(now, (staged / rel).read_bytes())
            assert ds.compare_and_swap(key, save_value(token, files), kv.mod_revision)
        d.wait_event("bootstrap_changed")
        started = d.wait_event("rollout_started", rollout_kind="ca")
        new_generation = disk_generation(Layout(dn.data))
        assert new_generation not in (None, old_generation)
        assert started["rollout_id"] == f"ca-{new_generation}"
        assert "taken from the datastore" in started["reason"]
        for name, rel in BOOTSTRAP_FIELDS.items():
            path = dn.data / "server" / rel
            assert path.read_bytes() == files[name].content, rel
            assert path.stat().st_mtime_ns == files[name].unix_ns, rel
        d.wait_event("rollout_node_done", rollout_id=started["rollout_id"])
        assert not (dn.data / "server" / "db" / "rke2certd.sqlite").exists()
        assert d.events("task_failed") == [], d.tail()
