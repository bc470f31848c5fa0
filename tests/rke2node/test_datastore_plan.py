"""Which datastore a node uses (pure: from the configuration), and the member list of
`/db/info`. The real stores are opened in test_hook.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rke2certd.config import Config
from rke2certd.errors import ConfigError
from rke2certd.node.rke2_datastore import (
    UnsupportedDatastoreError,
    member_client_urls,
    plan_datastore,
)
from rke2certd.pki.layout import Layout

DATA = Path("/var/lib/rancher/rke2")
ETCD = DATA / "server" / "tls" / "etcd"
NODE_FILES = (ETCD / "server-ca.crt", ETCD / "client.crt", ETCD / "client.key")


def _cfg(**doc: Any) -> Config:
    doc = {k.replace("_", "-"): v for k, v in doc.items()}
    return Config.from_mapping({"data-dir": str(DATA), **doc})


def _plan(**doc: Any) -> Any:
    cfg = _cfg(**doc)
    return plan_datastore(cfg, Layout(cfg.data_dir))


def test_standalone_keeps_sqlite() -> None:
    plan = _plan()
    assert (plan.kind, plan.shared_with_rke2) == ("sqlite", False)
    assert plan.endpoint == f"sqlite://{DATA}/server/db/rke2certd.sqlite"
    assert "standalone SQLite" in plan.description


def test_embedded_etcd_on_an_etcd_node() -> None:
    plan = _plan(rke2_config="/etc/rancher/rke2/config.yaml")
    assert (plan.kind, plan.endpoint, plan.embedded) == ("etcd", "https://127.0.0.1:2379", True)
    assert (plan.cafile, plan.certfile, plan.keyfile) == NODE_FILES
    assert "RKE2's embedded etcd" in plan.description


def test_our_datastore_files_override_the_node_files() -> None:
    plan = _plan(rke2_config="/x", datastore_cafile="/ca.pem")
    assert (plan.cafile, plan.certfile) == (Path("/ca.pem"), NODE_FILES[1])


def test_members_on_a_control_plane_only_node() -> None:
    plan = _plan(rke2_config="/x", roles=["control-plane", "agent"], server="https://s:9345")
    assert (plan.kind, plan.endpoint, plan.embedded) == ("etcd-members", "", True)
    assert (plan.cafile, plan.certfile, plan.keyfile) == NODE_FILES
    assert "https://s:9345/db/info" in plan.description


def test_control_plane_only_without_server_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no `server` to join"):
        _plan(rke2_config="/x", roles=["control-plane"])


def test_external_etcd_as_rke2_reaches_it() -> None:
    files = {"datastore_cafile": "/ca", "datastore_certfile": "/c", "datastore_keyfile": "/k"}
    https = _plan(rke2_config="/x", datastore_endpoint="https://e1:2379,https://e2:2379", **files)
    assert (https.kind, https.embedded, https.shared_with_rke2) == ("etcd", False, True)
    assert (https.cafile, https.certfile, https.keyfile) == (Path("/ca"), Path("/c"), Path("/k"))
    bare = _plan(rke2_config="/x", datastore_endpoint="https://e1:2379")
    assert (bare.cafile, bare.certfile, bare.keyfile) == (None, None, None), "as RKE2: none"
    http = _plan(rke2_config="/x", datastore_endpoint="http://e1:2379", datastore_cafile="/ca")
    assert (http.cafile, http.certfile, http.keyfile) == (None, None, None)


def test_standalone_http_etcd_needs_no_files() -> None:
    plan = _plan(datastore_endpoint="http://127.0.0.1:2379")
    assert (plan.cafile, plan.certfile, plan.keyfile) == (None, None, None)


@pytest.mark.parametrize(
    "endpoint",
    [
        "mysql://rke2:s3cret@tcp(db:3306)/rke2",
        "postgres://rke2:s3cret@db:5432/rke2",
        "sqlite:///var/lib/rancher/rke2/server/db/state.db",
        "nats://db:4222",
    ],
)
def test_sql_datastores_of_rke2_are_refused_clearly(endpoint: str) -> None:
    with pytest.raises(UnsupportedDatastoreError) as err:
        _plan(rke2_config="/x", datastore_endpoint=endpoint)
    text = str(err.value)
    assert "kine" in text and "embedded etcd" in text and "external etcd" in text
    assert "uninstall rke2certd" in text or "move RKE2 to etcd" in text
    assert "s3cret" not in text, "a DSN's password is never shown"


def test_member_list_of_db_info() -> None:
    doc = {
        "members": [
            {"ID": 1, "name": "a", "clientURLs": ["https://10.0.0.1:2379"]},
            {"name": "b", "clientURLs": ["https://10.0.0.2:2379"], "isLearner": True},
            {"name": "me", "clientURLs": ["https://10.0.0.9:2379"]},
            {"name": "c", "clientURLs": ["https://10.0.0.3:2379", "unix://x"]},
        ]
    }
    urls = member_client_urls(doc, ("10.0.0.9",))
    assert urls == ["https://10.0.0.1:2379", "https://10.0.0.3:2379"]


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"members": "x"},
        {"members": ["x"]},
        {"members": [{"clientURLs": "https://a:2379"}]},
        {"members": [{"clientURLs": [1]}]},
    ],
)
def test_bad_member_lists_are_refused(doc: Any) -> None:
    with pytest.raises(ValueError, match="not"):
        member_client_urls(doc, ())


def test_local_member_candidates() -> None:
    from rke2certd.node.rke2_datastore import local_member_urls

    assert local_member_urls("https://127.0.0.1:2379", ("10.0.0.5", "fd00::5", "127.0.0.1")) == [
        "https://127.0.0.1:2379",
        "https://10.0.0.5:2379",
        "https://[fd00::5]:2379",
    ]
    assert local_member_urls("https://127.0.0.1:12379", ("10.0.0.5",)) == [
        "https://127.0.0.1:12379"
    ], "a configured endpoint is used alone"
