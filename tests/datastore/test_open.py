"""`open_datastore`: which backend a `datastore-endpoint` value selects, and the errors for the
rest (never showing a password)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rke2certd.datastore import SQLiteDatastore, open_datastore
from rke2certd.datastore.etcd import EtcdDatastore
from rke2certd.errors import ConfigError
from tests.datastore.tls import EtcdPKI
from tests.harness.etcd import EtcdCluster


@pytest.mark.parametrize(
    "endpoint, relative",
    [
        ("", "server/db/rke2certd.sqlite"),
        ("  ", "server/db/rke2certd.sqlite"),
        ("sqlite://", "server/db/rke2certd.sqlite"),
        ("sqlite://custom/x.sqlite", "custom/x.sqlite"),
    ],
)
def test_sqlite_paths(tmp_path: Path, endpoint: str, relative: str) -> None:
    with open_datastore(endpoint, data_dir=tmp_path) as ds:
        assert isinstance(ds, SQLiteDatastore)
        assert ds.path == tmp_path / relative
        assert ds.path.is_file()


def test_absolute_sqlite_path(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "db.sqlite"
    with open_datastore(f"sqlite://{target}", data_dir=tmp_path / "data") as ds:
        assert isinstance(ds, SQLiteDatastore) and ds.path == target


@pytest.mark.parametrize(
    "endpoint",
    [
        "mysql://root:hunter2@tcp(db:3306)/k3s",
        "postgres://k3s:hunter2@db:5432/k3s?sslmode=disable",
        "unix://kine.sock",
        "root:hunter2@tcp(db:3306)/k3s",
        "nats://db:4222",
    ],
)
def test_other_datastores_are_refused_clearly(tmp_path: Path, endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"supports only SQLite .* and etcd") as err:
        open_datastore(endpoint, data_dir=tmp_path)
    assert "hunter2" not in str(err.value)
    assert not (tmp_path / "server").exists()


@pytest.mark.parametrize(
    "endpoint, words",
    [
        ("sqlite:///var/lib/state.db?_journal=WAL&cache=shared", "no ?parameters"),
        ("https://", "not an http(s)://host[:port] etcd endpoint"),
        ("https://127.0.0.1:2379,ftp://x", "not an http(s)://host[:port] etcd endpoint"),
    ],
)
def test_malformed_endpoints(tmp_path: Path, endpoint: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        open_datastore(endpoint, data_dir=tmp_path)


@pytest.mark.etcd
def test_https_selects_etcd(etcd_single: EtcdCluster, etcd_pki: EtcdPKI, tmp_path: Path) -> None:
    endpoint = etcd_single.endpoint.replace("127.0.0.1", "localhost")  # name in the cert's SANs
    with open_datastore(
        endpoint,
        data_dir=tmp_path,
        cafile=etcd_pki.client.ca,
        certfile=etcd_pki.client.cert,
        keyfile=etcd_pki.client.key,
    ) as ds:
        assert isinstance(ds, EtcdDatastore)
        assert ds.location == f"etcd at {endpoint}"
    assert not (tmp_path / "server").exists()
