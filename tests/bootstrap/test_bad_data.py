"""Bad data and an unreachable datastore at `rke2certd renew`: a clear
error, and nothing changed on disk or in the store. `--offline-ok` renews leaves from a complete
CA set on disk when etcd is down, and only then."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rke2certd.errors import Rke2certdError
from tests.conftest import run_cli

from .support import (
    Backend,
    bootstrap_key,
    ca_set,
    openssl_verify_leaves,
    renew_in_process,
    tree,
)

WRONG_TOKEN = "bootstrap data already found and encrypted with a different token"
TOKEN = "K10::server:the-cluster-token"
PASSWORD = "the-cluster-token"


def assert_clean_failure(res: object, *needles: str) -> None:
    rc, stderr = getattr(res, "returncode"), getattr(res, "stderr")  # noqa: B009
    assert rc != 0
    assert "Traceback" not in stderr, stderr
    assert "rke2certd: error: " in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def set_token(cfg: Path, token: str) -> None:
    doc = yaml.safe_load(cfg.read_text())
    doc["token"] = token
    cfg.write_text(yaml.safe_dump(doc))


def made_node(backend: Backend, name: str = "node", **config: object) -> tuple[Path, Path]:
    """A complete server (made in-process: the CLI is what the tests run next)."""
    cfg, data = backend.node(name, token=TOKEN, **config)
    renew_in_process(cfg)
    return cfg, data


# -- wrong token ------------------------------------------------------------------------------


def test_joining_server_with_a_wrong_token_is_refused_and_writes_nothing(
    backend: Backend,
) -> None:
    backend.shared = True
    made_node(backend, "first")
    store = backend.dump()
    cfg, data = backend.node("second", token="K10::server:not-the-cluster-token")
    res = run_cli("-c", cfg, "renew")
    assert_clean_failure(res, WRONG_TOKEN)
    assert tree(data) == {}
    assert backend.dump() == store  # no second key, no creation lock left behind


def test_server_whose_token_changed_is_refused_and_its_files_stay_as_they_are(
    backend: Backend,
) -> None:
    cfg, data = made_node(backend)
    disk, store = tree(data), backend.dump(data)
    set_token(cfg, "a-different-bare-token")
    res = run_cli("-c", cfg, "renew")
    assert_clean_failure(res, WRONG_TOKEN)
    assert tree(data) == disk
    assert backend.dump(data) == store
    assert list(backend.bootstrap_values(data)) == [bootstrap_key(PASSWORD)]


def test_agent_token_in_place_of_the_server_token_is_refused(backend: Backend) -> None:
    cfg, data = made_node(backend)
    agent_token = (data / "server" / "agent-token").read_text().strip()
    set_token(cfg, agent_token)
    before = tree(data)
    res = run_cli("-c", cfg, "renew")
    assert_clean_failure(res, "this is an agent token")
    assert agent_token.rsplit(":", 1)[1] not in res.stderr  # the secret is never printed
    assert tree(data) == before


# -- damaged values ---------------------------------------------------------------------------


def _value(backend: Backend, data: Path) -> bytes:
    return backend.bootstrap_values(data)[bootstrap_key(PASSWORD)]


def _truncated(value: bytes, keep: int) -> bytes:
    salt, _, encoded = value.partition(b":")
    return salt + b":" + base64.b64encode(base64.b64decode(encoded)[:keep])


DAMAGES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "garbage": (lambda v: b"garbage", "not in the '<salt>:<base64>' form"),
    "bad-base64": (lambda v: v.split(b":")[0] + b":%%%not-base64%%%", "bad base64"),
    "truncated-below-nonce-and-tag": (
        lambda v: _truncated(v, 20),
        "truncated: 20 bytes of ciphertext",
    ),
    "truncated-ciphertext": (
        lambda v: _truncated(v, len(base64.b64decode(v.split(b":")[1])) // 2),
        "the stored value is damaged",
    ),
}


def test_damaged_value_at_the_key_is_a_clear_error_and_changes_nothing(
    backend: Backend,
) -> None:
    cfg, data = made_node(backend)
    good = _value(backend, data)
    for name, (damage, words) in DAMAGES.items():
        backend.put(bootstrap_key(PASSWORD), damage(good), data)
        disk, store = tree(data), backend.dump(data)
        if name == "garbage":  # through the CLI once: exit code and message
            res = run_cli("-c", cfg, "renew")
            assert_clean_failure(res, "bootstrap", words)
        else:
            with pytest.raises(Rke2certdError, match=re.escape(words)):
                renew_in_process(cfg)
        assert tree(data) == disk, name
        assert backend.dump(data) == store, name


# -- the datastore unreachable ---------------------------------------------------------------


def test_etcd_down_at_start_fails_fast_with_a_clear_error_and_changes_nothing(
    etcd_backend: Backend,
) -> None:
    backend = etcd_backend
    cfg, data = made_node(backend)
    assert run_cli("-c", cfg, "renew").returncode == 0  # the same run, etcd up
    store = backend.dump()
    disk = tree(data)
    backend.down()
    try:
        res = run_cli("-c", cfg, "renew")
    finally:
        backend.up()
    assert_clean_failure(res, "cannot reach the datastore", "check that etcd is running")
    # Fast: the CLI's few tries and short backoff are counted (not timed) in
    # tests/datastore/test_etcd.py::test_down_at_start_fails_fast_and_clearly.
    assert tree(data) == disk
    assert backend.dump() == store


def test_broken_sqlite_store_at_start_is_a_clear_error_and_changes_nothing(
    tmp_path: Path,
) -> None:
    backend = Backend("sqlite", tmp_path)
    cfg, data = made_node(backend)
    db = data / "server" / "db" / "rke2certd.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    disk = tree(data, include_db=True)
    res = run_cli("-c", cfg, "renew")
    assert_clean_failure(res, str(db))
    assert tree(data, include_db=True) == disk
    # --offline-ok is for an unreachable etcd, not for a damaged local store
    res = run_cli("-c", cfg, "renew", "--offline-ok")
    assert_clean_failure(res, str(db))
    assert tree(data, include_db=True) == disk


def test_offline_ok_renews_leaves_from_the_cas_on_disk_when_etcd_is_down(
    etcd_backend: Backend,
) -> None:
    backend = etcd_backend
    cfg, data = made_node(backend)
    cas = ca_set(data)
    admin = data / "server" / "tls" / "client-admin.crt"
    admin.unlink()
    backend.down()
    try:
        before = tree(data)
        strict = run_cli("-c", cfg, "renew")
        assert_clean_failure(strict, "cannot reach the datastore")
        assert tree(data) == before

        res = run_cli("-c", cfg, "renew", "--offline-ok")
        assert res.returncode == 0, res.stderr
        assert "datastore_unreachable" in res.stderr
    finally:
        backend.up()
    assert admin.exists()
    assert ca_set(data) == cas
    openssl_verify_leaves(data)


def test_offline_ok_still_fails_when_the_ca_set_on_disk_is_incomplete(
    etcd_backend: Backend,
) -> None:
    backend = etcd_backend
    cfg, data = made_node(backend)
    (data / "server" / "tls" / "etcd" / "peer-ca.key").unlink()
    backend.down()
    try:
        before = tree(data)
        res = run_cli("-c", cfg, "renew", "--offline-ok")
    finally:
        backend.up()
    assert_clean_failure(res, "cannot reach the datastore")
    assert tree(data) == before
