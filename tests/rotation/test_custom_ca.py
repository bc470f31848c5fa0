"""`ca generate-custom`: upstream's custom CA topology, judged with openssl."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rke2certd.commands.generate_custom import CUSTOM_TYPES, generate_custom
from rke2certd.errors import UsageError
from rke2certd.node.ca_material import load_ca_set
from rke2certd.node.staged_read import current_files, read_staged_dir
from rke2certd.pki.certs import load_bundle
from rke2certd.pki.keys import load_keys, public_der
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import ROTATABLE, validate_staged_set

from .support import first_cert, issue_leaf, make_upstream_node, openssl, openssl_verify


def _fingerprint(pem: Path) -> str:
    out = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", pem).stdout.decode()
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def _as_current(tls: Path) -> dict[str, bytes]:
    return {rel: (tls / rel.removeprefix("tls/")).read_bytes() for rel in ROTATABLE}


def test_generated_set_verifies_to_the_root(tmp_path: Path, now: datetime) -> None:
    out = tmp_path / "opt" / "server" / "tls"
    result = generate_custom(out, now, "ecdsa-p256", data_dir=tmp_path / "data")
    for kind in CUSTOM_TYPES:
        for suffix, mode in ((".pem", 0o644), (".key", 0o600), (".crt", 0o644)):
            assert (out / f"{kind}-ca{suffix}").stat().st_mode & 0o777 == mode
        verdict = openssl(
            "verify",
            "-CAfile",
            out / "root-ca.pem",
            "-untrusted",
            out / "intermediate-ca.pem",
            out / f"{kind}-ca.pem",
        )
        assert verdict.returncode == 0, verdict.stderr
        bundle = load_bundle((out / f"{kind}-ca.crt").read_bytes(), kind)
        assert len(bundle) == 3 and bundle[2] == first_cert(out / "root-ca.pem")
        assert isinstance(bundle[0].public_key(), ec.EllipticCurvePublicKey)
    assert (out / "etcd").stat().st_mode & 0o777 == 0o700
    chain, _ = issue_leaf(
        tmp_path / "leaf",
        (out / "server-ca.crt").read_bytes(),
        (out / "server-ca.key").read_bytes(),
        now,
    )
    assert ": OK" in openssl_verify(out / "root-ca.pem", chain, tmp_path)
    assert result.ca_hash == _fingerprint(out / "root-ca.pem")
    assert result.next_command == f"rke2certd certificate rotate-ca --path {out.parent}"
    assert set(result.remove) == {out / "root-ca.key", out / "intermediate-ca.key"}
    assert out / "root-ca.pem" in result.backup


def test_second_run_with_same_root_passes_rotate_ca_checks(tmp_path: Path, now: datetime) -> None:
    first = tmp_path / "first" / "server" / "tls"
    r1 = generate_custom(first, now, "ecdsa-p256", data_dir=tmp_path / "data")
    second = tmp_path / "second" / "server" / "tls"
    second.mkdir(parents=True)
    for name in ("root-ca.pem", "intermediate-ca.pem", "intermediate-ca.key", "service.key"):
        shutil.copy2(first / name, second / name)
    later = now + timedelta(seconds=5)
    r2 = generate_custom(second, later, "ecdsa-p256", data_dir=tmp_path / "data")
    assert r2.ca_hash == r1.ca_hash  # same root: the join token stays valid
    assert (second / "intermediate-ca.pem").read_bytes() == (
        first / "intermediate-ca.pem"
    ).read_bytes()
    assert not (second / "root-ca.key").exists()
    checks = validate_staged_set(read_staged_dir(second.parent), _as_current(first), later)
    assert checks.problems == (), checks.problems
    assert checks.accepted(force=False) and len(checks.changed) == 11
    old_service = load_keys((first / "service.key").read_bytes(), "old")
    new_service = load_keys((second / "service.key").read_bytes(), "new")
    assert [public_der(k) for k in new_service[1:]] == [public_der(k) for k in old_service]


def test_reuses_root_and_key_to_make_an_intermediate(tmp_path: Path, now: datetime) -> None:
    seed = tmp_path / "seed"
    generate_custom(seed, now, "ecdsa-p256", data_dir=tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy2(seed / "root-ca.pem", out)
    shutil.copy2(seed / "root-ca.key", out)
    result = generate_custom(out, now, "ecdsa-p256", data_dir=tmp_path / "data")
    assert "Using the existing root certificate" in result.messages[0]
    assert (
        first_cert(out / "intermediate-ca.pem").issuer == first_cert(seed / "root-ca.pem").subject
    )
    verdict = openssl(
        "verify",
        "-CAfile",
        out / "root-ca.pem",
        "-untrusted",
        out / "intermediate-ca.pem",
        out / "client-ca.pem",
    )
    assert verdict.returncode == 0, verdict.stderr
    assert any("rotate-ca reads DIR/tls" in m for m in result.messages)  # dir not named tls


def test_refuses_incomplete_inputs(tmp_path: Path, now: datetime) -> None:
    seed = tmp_path / "seed"
    generate_custom(seed, now, "ecdsa-p256", data_dir=tmp_path / "data")
    cases = {
        "root-only": ["root-ca.pem"],
        "intermediate-without-key": ["root-ca.pem", "intermediate-ca.pem"],
        "intermediate-without-root": ["intermediate-ca.pem", "intermediate-ca.key"],
        "root-key-without-cert": ["root-ca.key"],
    }
    for name, files in cases.items():
        out = tmp_path / name
        out.mkdir()
        for f in files:
            shutil.copy2(seed / f, out)
        with pytest.raises(UsageError):
            generate_custom(out, now, "ecdsa-p256", data_dir=tmp_path / "data")
        assert sorted(p.name for p in out.iterdir()) == sorted(files), name


def test_fresh_node_takes_the_set_and_in_use_node_is_refused(tmp_path: Path, now: datetime) -> None:
    fresh = Layout(tmp_path / "fresh")
    result = generate_custom(fresh.tls, now, "ecdsa-p256", data_dir=fresh.data_dir)
    assert result.next_command == "systemctl start rke2-server"
    ca_set = load_ca_set(fresh)  # what a first start reads
    assert set(ca_set.cas) == {
        "server-ca",
        "client-ca",
        "request-header-ca",
        "etcd/server-ca",
        "etcd/peer-ca",
    }

    node = make_upstream_node(tmp_path / "node")
    before = current_files(node.tls)
    with pytest.raises(UsageError, match="in-use server/tls"):
        generate_custom(node.tls, now, "ecdsa-p256", data_dir=node.data_dir)
    assert current_files(node.tls) == before
    assert sorted(p.name for p in node.tls.iterdir()) == sorted(
        [
            "etcd",
            "server-ca.crt",
            "server-ca.key",
            "client-ca.crt",
            "client-ca.key",
            "request-header-ca.crt",
            "request-header-ca.key",
            "service.key",
        ]
    )


def test_default_rsa4096_root_and_intermediate(tmp_path: Path, now: datetime) -> None:
    out = tmp_path / "tls"
    result = generate_custom(out, now, data_dir=tmp_path / "data")
    for name in ("root-ca.key", "intermediate-ca.key"):
        (key,) = load_keys((out / name).read_bytes(), name)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    assert result.ca_hash == _fingerprint(out / "root-ca.pem")
    root = first_cert(out / "root-ca.pem")
    assert (root.not_valid_after_utc - now).days in (7299, 7300)
    inter = first_cert(out / "intermediate-ca.pem")
    assert (inter.not_valid_after_utc - now).days in (3699, 3700)
