"""rotate-ca's checks on bad staged sets: each rejected with all of its reasons, read from disk
the way rotate-ca reads them (no symlink followed)."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from rke2certd.errors import StorageError
from rke2certd.node.staged_read import current_files, read_staged_dir
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, load_bundle
from rke2certd.pki.keys import PrivateKey, key_to_pem, load_key, new_ec_key, new_rsa_key
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import (
    SIZE_LIMIT,
    Check,
    StagedSetResult,
    validate_staged_set,
)

CRT, KEY = "tls/server-ca.crt", "tls/server-ca.key"


@pytest.fixture
def staged(rotated: tuple[Layout, Path], tmp_path: Path) -> Path:
    """A private copy of a good cross-signed set (DIR: tmp/staged, files in DIR/tls)."""
    shutil.copytree(rotated[1], tmp_path / "staged" / "tls")
    return tmp_path / "staged"


@pytest.fixture
def layout(rotated: tuple[Layout, Path]) -> Layout:
    return rotated[0]


def check(layout: Layout, staged: Path, now: datetime) -> StagedSetResult:
    return validate_staged_set(read_staged_dir(staged), current_files(layout.tls), now)


def reasons(result: StagedSetResult) -> set[tuple[str, Check]]:
    return {(p.file, p.check) for p in result.problems}


def old_ca(layout: Layout, ca: str = "server-ca") -> tuple[x509.Certificate, PrivateKey]:
    cert = load_bundle(layout.ca_cert(ca).read_bytes(), "old")[0]
    return cert, load_key(layout.ca_key(ca).read_bytes(), "old key")


def intermediate(
    layout: Layout, key: PrivateKey, now: datetime, days: int = 3650
) -> x509.Certificate:
    signer, signer_key = old_ca(layout)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-intermediate")])
    return build.signed_ca(name, key.public_key(), signer, signer_key, now, days)


def write_ca(staged: Path, certs: list[x509.Certificate], key: PrivateKey) -> None:
    (staged / CRT).write_bytes(bundle_pem(certs))
    (staged / KEY).write_bytes(key_to_pem(key))


def test_good_set_passes(layout: Layout, staged: Path, now: datetime) -> None:
    result = check(layout, staged, now)
    assert result.problems == () and result.warnings == ()
    assert len(result.changed) == 11 and not result.nothing_to_do


def test_mismatched_key(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / KEY).write_bytes(key_to_pem(new_ec_key()))
    result = check(layout, staged, now)
    assert reasons(result) == {(KEY, Check.KEY_MATCH)}
    assert not result.accepted(force=True)
    assert f"{staged}/{KEY} does not match the first certificate" in result.problems[0].message


def test_key_order_swapped_is_explained(layout: Layout, staged: Path, now: datetime) -> None:
    blocks = (staged / KEY).read_bytes().split(b"-----END EC PRIVATE KEY-----\n")
    swapped = blocks[1] + b"-----END EC PRIVATE KEY-----\n" + blocks[0]
    (staged / KEY).write_bytes(swapped + b"-----END EC PRIVATE KEY-----\n")
    result = check(layout, staged, now)
    assert reasons(result) == {(KEY, Check.KEY_MATCH)}
    assert "key #2 matches: put that key first" in result.problems[0].message


def test_single_cert_bundle(layout: Layout, staged: Path, now: datetime) -> None:
    """The new intermediate alone: no chain to the current CA, and no root either, so a client
    given only this file could verify nothing: --force cannot save it."""
    bundle = load_bundle((staged / CRT).read_bytes(), "new")
    (staged / CRT).write_bytes(bundle_pem(bundle[:1]))
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.SINGLE_CERT), (CRT, Check.CHAIN), (CRT, Check.ROOT)}
    assert not result.accepted(force=True) and not result.accepted(force=False)


def test_expired_ca(layout: Layout, staged: Path, now: datetime) -> None:
    key = new_ec_key()
    expired = intermediate(layout, key, now - timedelta(days=400), days=10)
    write_ca(staged, [expired, old_ca(layout)[0]], key)
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.VALIDITY), (CRT, Check.CHAIN)}
    assert not result.accepted(force=True)
    assert "expired on" in " ".join(p.message for p in result.problems)


def test_ca_expiring_within_a_year(layout: Layout, staged: Path, now: datetime) -> None:
    key = new_ec_key()
    write_ca(staged, [intermediate(layout, key, now, days=200), old_ca(layout)[0]], key)
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.VALIDITY)}
    assert "at least 365 more days" in result.problems[0].message


def test_leaf_cert_in_ca_slot(layout: Layout, staged: Path, now: datetime) -> None:
    signer, signer_key = old_ca(layout)
    key = new_ec_key()
    leaf = build.leaf(
        "kube-apiserver",
        (),
        "server",
        ("localhost",),
        key.public_key(),
        signer,
        signer_key,
        now,
        days=800,
    )
    write_ca(staged, [leaf, signer], key)
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.NOT_CA)}
    assert "is not a CA" in result.problems[0].message


def test_truncated_pem(layout: Layout, staged: Path, now: datetime) -> None:
    data = (staged / CRT).read_bytes()
    (staged / CRT).write_bytes(data[: len(data) // 2])
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.PARSE)}
    message = result.problems[0].message
    assert f"{staged}/{CRT}" in message and "truncated" in message
    assert not result.accepted(force=True)


def test_symlinked_file(layout: Layout, staged: Path, now: datetime) -> None:
    real = staged.parent / "elsewhere.crt"
    (staged / "tls" / "client-ca.crt").rename(real)
    (staged / "tls" / "client-ca.crt").symlink_to(real)
    result = check(layout, staged, now)
    assert reasons(result) == {("tls/client-ca.crt", Check.FILE)}
    assert "symbolic link" in result.problems[0].message
    assert not result.accepted(force=True)


def test_symlinked_directory(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / "tls" / "etcd").rename(staged.parent / "etcd-real")
    (staged / "tls" / "etcd").symlink_to(staged.parent / "etcd-real")
    result = check(layout, staged, now)
    assert {f for f, c in reasons(result) if c is Check.FILE} == {
        "tls/etcd/server-ca.crt",
        "tls/etcd/server-ca.key",
        "tls/etcd/peer-ca.crt",
        "tls/etcd/peer-ca.key",
    }


def test_world_writable_file(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / "tls" / "request-header-ca.crt").chmod(0o666)
    result = check(layout, staged, now)
    assert reasons(result) == {("tls/request-header-ca.crt", Check.FILE)}
    assert "chmod go-w" in result.problems[0].message


def test_rsa_1024(layout: Layout, staged: Path, now: datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    write_ca(staged, [intermediate(layout, key, now), old_ca(layout)[0]], key)
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.KEY_TYPE), (KEY, Check.KEY_TYPE)}
    assert all("RSA 1024" in p.message for p in result.problems)


def test_missing_old_service_key(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / "tls" / "service.key").write_bytes(key_to_pem(new_rsa_key()))
    result = check(layout, staged, now)
    assert reasons(result) == {("tls/service.key", Check.SERVICE_KEY_KEPT)}
    assert result.accepted(force=True) and not result.accepted(force=False)


def test_service_key_must_be_rsa(layout: Layout, staged: Path, now: datetime) -> None:
    path = staged / "tls" / "service.key"
    path.write_bytes(path.read_bytes() + key_to_pem(new_ec_key()))
    result = check(layout, staged, now)
    assert reasons(result) == {("tls/service.key", Check.KEY_TYPE)}


def test_empty_dir_is_nothing_to_do(layout: Layout, tmp_path: Path, now: datetime) -> None:
    (tmp_path / "empty").mkdir()
    result = check(layout, tmp_path / "empty", now)
    assert result.nothing_to_do and result.problems == () and result.accepted(force=False)
    assert len(result.warnings) == 11
    assert all(w.startswith("using current data for tls/") for w in result.warnings)
    assert dict(result.files) == current_files(layout.tls)


def test_empty_files_fall_back(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / CRT).write_bytes(b"")
    (staged / KEY).write_bytes(b"")
    result = check(layout, staged, now)
    assert result.problems == ()
    assert (
        CRT not in result.changed and result.files[CRT] == layout.ca_cert("server-ca").read_bytes()
    )
    assert f"using current data for {CRT} (not staged, or empty)" in result.warnings


def test_same_certs_in_other_bytes_keep_current_bytes(
    layout: Layout, tmp_path: Path, now: datetime
) -> None:
    staged = tmp_path / "same"
    (staged / "tls").mkdir(parents=True)
    (staged / CRT).write_bytes(b"\n" + layout.ca_cert("server-ca").read_bytes() + b"\n\n")
    result = check(layout, staged, now)
    assert result.nothing_to_do
    assert result.files[CRT] == layout.ca_cert("server-ca").read_bytes()


def test_new_unrelated_root_needs_force(layout: Layout, staged: Path, now: datetime) -> None:
    key = new_ec_key()
    write_ca(staged, [build.self_signed_ca("brand-new-root", key, now)], key)
    result = check(layout, staged, now)
    assert reasons(result) == {(CRT, Check.SINGLE_CERT), (CRT, Check.CHAIN)}
    chain = next(p for p in result.problems if p.check is Check.CHAIN)
    assert "does not chain to the current CA" in chain.message and chain.forceable
    assert not result.accepted(force=False) and result.accepted(force=True)
    error = result.error(force=False)
    assert error is not None and "--force saves it anyway" in str(error)
    assert result.error(force=True) is None


def test_every_reason_of_a_bad_set_at_once(layout: Layout, staged: Path, now: datetime) -> None:
    (staged / KEY).write_bytes(key_to_pem(new_ec_key()))
    data = (staged / "tls" / "client-ca.crt").read_bytes()
    (staged / "tls" / "client-ca.crt").write_bytes(data[:100])
    (staged / "tls" / "etcd" / "peer-ca.key").chmod(0o646)
    (staged / "tls" / "service.key").write_bytes(key_to_pem(new_rsa_key()))
    result = check(layout, staged, now)
    assert reasons(result) == {
        (KEY, Check.KEY_MATCH),
        ("tls/client-ca.crt", Check.PARSE),
        ("tls/etcd/peer-ca.key", Check.FILE),
        ("tls/service.key", Check.SERVICE_KEY_KEPT),
    }
    error = result.error(force=True)
    assert error is not None and len(error.problems) == 3  # service key: skipped by --force


def test_reader_refuses_fifo_and_oversized_files(tmp_path: Path) -> None:
    tls = tmp_path / "d" / "tls"
    tls.mkdir(parents=True)
    os.mkfifo(tls / "server-ca.crt")
    with open(tls / "client-ca.crt", "wb") as f:
        f.truncate(SIZE_LIMIT + 1)
    staged = read_staged_dir(tmp_path / "d")
    fifo, big = staged.files["tls/server-ca.crt"], staged.files["tls/client-ca.crt"]
    assert not fifo.is_regular and fifo.data is None
    assert big.data is None and big.size == SIZE_LIMIT + 1
    assert staged.files["tls/service.key"].exists is False


def test_reader_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a directory"):
        read_staged_dir(tmp_path / "nope")
