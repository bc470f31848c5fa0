"""Path building as Go's x509.Verify does it: every path, real signatures, CA rules, no loops."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID

from rke2certd.pki import build
from rke2certd.pki.certs import load_bundle, ski
from rke2certd.pki.chain import MAX_SIGNATURE_CHECKS, ChainError, find_paths, verify_chain
from rke2certd.pki.keys import PrivateKey, load_key, new_ec_key, new_rsa_key

NOW = datetime(2030, 1, 1, tzinfo=UTC)
CA = tuple[x509.Certificate, PrivateKey]


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def root(cn: str, key: PrivateKey | None = None, days: int = 3650) -> CA:
    key = key or new_ec_key()
    return build.self_signed_ca(cn, key, NOW, days=days), key


def sub_ca(cn: str, issuer: CA, key: PrivateKey | None = None, **kw: int | None) -> CA:
    key = key or new_ec_key()
    days = kw.pop("days", 3650) or 3650
    cert = build.signed_ca(name(cn), key.public_key(), issuer[0], issuer[1], NOW, days, **kw)
    return cert, key


def leaf_of(issuer: CA) -> x509.Certificate:
    key = new_ec_key()
    return build.leaf("leaf", (), "server", ("localhost",), key.public_key(), *issuer, NOW)


def raw_builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
    )


def test_direct_and_through_intermediates() -> None:
    r = root("root")
    i1 = sub_ca("i1", r)
    i2 = sub_ca("i2", i1)
    leaf = leaf_of(i2)
    assert verify_chain(leaf, [r[0]], [i1[0], i2[0]], NOW) == [[leaf, i2[0], i1[0], r[0]]]
    assert verify_chain(i1[0], [r[0]]) == [[i1[0], r[0]]]


def test_leaf_that_is_a_root_is_its_own_chain() -> None:
    r = root("root")
    assert verify_chain(r[0], [r[0]]) == [[r[0]]]


def test_every_path_is_tried_cross_signed() -> None:
    """The first candidate (the new self-signed root, untrusted) is a dead end; the cross-signed
    copy of the same root leads to the old trusted root."""
    old = root("old")
    new_key = new_ec_key()
    new_self = root("new-root", new_key)
    new_cross = (
        build.signed_ca(new_self[0].subject, new_key.public_key(), *old, NOW, 3650),
        new_key,
    )
    inter = sub_ca("inter", new_self)
    chains = verify_chain(inter[0], [old[0]], [new_self[0], new_cross[0]], NOW)
    assert chains == [[inter[0], new_cross[0], old[0]]]
    # With both roots trusted, Go's order: roots first, then through intermediates.
    both = verify_chain(inter[0], [old[0], new_self[0]], [new_self[0], new_cross[0]], NOW)
    assert both == [[inter[0], new_self[0]], [inter[0], new_cross[0], old[0]]]


def test_same_name_impostor_with_same_key_id_is_skipped() -> None:
    real = root("ca")
    impostor_key = new_ec_key()
    real_ski = ski(real[0])
    assert real_ski is not None
    impostor = (
        raw_builder(real[0].subject, real[0].subject, impostor_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(real_ski), critical=False)
        .sign(impostor_key, hashes.SHA256())
    )
    leaf = leaf_of(real)
    assert verify_chain(leaf, [impostor, real[0]], [], NOW) == [[leaf, real[0]]]
    with pytest.raises(ChainError, match="signature does not verify"):
        verify_chain(leaf, [impostor], [], NOW)


def test_loops_terminate() -> None:
    a_key, b_key = new_ec_key(), new_ec_key()
    a, b = root("A", a_key), root("B", b_key)
    a_by_b = build.signed_ca(a[0].subject, a_key.public_key(), *b, NOW, 3650)
    b_by_a = build.signed_ca(b[0].subject, b_key.public_key(), *a, NOW, 3650)
    leaf = leaf_of(a)
    unrelated = root("C")
    with pytest.raises(ChainError):
        verify_chain(leaf, [unrelated[0]], [a_by_b, b_by_a, a[0], b[0]], NOW)
    chains = verify_chain(leaf, [b[0]], [a_by_b, b_by_a], NOW)
    assert chains == [[leaf, a_by_b, b[0]]]


def test_signature_check_limit() -> None:
    real = root("ca")
    fakes = []
    for _ in range(MAX_SIGNATURE_CHECKS + 5):
        k = new_ec_key()
        fakes.append(
            raw_builder(real[0].subject, real[0].subject, k)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256())
        )
    with pytest.raises(ChainError, match="signature-check limit"):
        verify_chain(leaf_of(real), fakes, fakes, NOW)


def test_issuer_must_be_a_ca() -> None:
    r = root("root")
    not_ca_key = new_ec_key()
    not_ca = build.leaf("fake-ca", (), "server", (), not_ca_key.public_key(), *r, NOW)
    key = new_ec_key()
    victim = raw_builder(name("victim"), not_ca.subject, key).sign(not_ca_key, hashes.SHA256())
    with pytest.raises(ChainError, match="is not a CA"):
        verify_chain(victim, [r[0]], [not_ca], NOW)


def test_issuer_needs_key_cert_sign() -> None:
    key = new_ec_key()
    no_sign = (
        raw_builder(name("nosign"), name("nosign"), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(build.LEAF_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ChainError, match="keyCertSign"):
        verify_chain(leaf_of((no_sign, key)), [no_sign], [], NOW)


def test_path_length() -> None:
    r_key = new_ec_key()
    r = (
        raw_builder(name("r0"), name("r0"), r_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(build.CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(r_key.public_key()), False)
        .sign(r_key, hashes.SHA256())
    )
    inter = sub_ca("i", (r, r_key))
    leaf = leaf_of(inter)
    with pytest.raises(ChainError, match="intermediate"):
        verify_chain(leaf, [r], [inter[0]], NOW)
    assert verify_chain(inter[0], [r], [], NOW) == [[inter[0], r]]


def test_validity_only_when_now_given() -> None:
    r = root("root")
    expired = sub_ca("expired", r, days=10)
    leaf = leaf_of(expired)
    assert verify_chain(leaf, [r[0]], [expired[0]]) == [[leaf, expired[0], r[0]]]
    with pytest.raises(ChainError, match="expired on"):
        verify_chain(leaf, [r[0]], [expired[0]], NOW + timedelta(days=30))
    with pytest.raises(ChainError, match="not valid before"):
        verify_chain(leaf, [r[0]], [expired[0]], NOW - timedelta(days=30))


def test_rsa_pkcs1_and_pss_and_ec_signatures() -> None:
    rsa_key = new_rsa_key(2048)
    r = root("rsa-root", rsa_key)
    pkcs1 = sub_ca("pkcs1", r)
    key = new_ec_key()
    pss = (
        raw_builder(name("pss"), r[0].subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(
            rsa_key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
        )
    )
    assert isinstance(pss.signature_algorithm_parameters, padding.PSS)
    for cert in (pkcs1[0], pss):
        assert verify_chain(cert, [r[0]], [], NOW) == [[cert, r[0]]]
    ec_leaf = leaf_of(pkcs1)
    assert verify_chain(ec_leaf, [r[0]], [pkcs1[0]], NOW)[0][0] == ec_leaf


def test_sha1_signature_is_refused(tmp_path: Path) -> None:
    """cryptography will not sign with SHA-1, so openssl makes the weak certificate."""
    for cmd in (
        "openssl ecparam -name prime256v1 -genkey -noout -out ca.key",
        "openssl req -x509 -new -key ca.key -subj /CN=ca -days 30 -out ca.crt",
        "openssl ecparam -name prime256v1 -genkey -noout -out weak.key",
        "openssl req -new -key weak.key -subj /CN=weak -out weak.csr",
        "openssl x509 -req -in weak.csr -CA ca.crt -CAkey ca.key -sha1 -days 10 -out weak.crt",
    ):
        subprocess.run(cmd.split(), cwd=tmp_path, check=True, capture_output=True)
    ca = load_bundle((tmp_path / "ca.crt").read_bytes(), "ca")[0]
    weak = load_bundle((tmp_path / "weak.crt").read_bytes(), "weak")[0]
    with pytest.raises(ChainError, match="SHA1"):
        verify_chain(weak, [ca], [])


@pytest.mark.filterwarnings("error")
def test_upstream_serial_zero_root(tmp_path: Path) -> None:
    """RKE2's CAs have serial 0; cryptography warns on load, load_bundle silences it."""
    key, cert = tmp_path / "ca.key", tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-key",
            key,
            "-subj",
            "/CN=zero",
            "-days",
            "30",
            "-set_serial",
            "0",
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    zero = load_bundle(cert.read_bytes(), cert)[0]  # no warning: load_bundle silences it
    with pytest.warns(UserWarning, match="serial number"):  # reading the serial still warns
        assert zero.serial_number == 0
    signer = load_key(key.read_bytes(), key)
    now = datetime.now(UTC)
    leaf_key = new_ec_key()
    leaf = build.leaf("x", (), "server", (), leaf_key.public_key(), zero, signer, now)
    assert verify_chain(leaf, [zero], [], now) == [[leaf, zero]]


def test_no_issuer_reason() -> None:
    leaf = leaf_of(root("somewhere"))
    with pytest.raises(ChainError, match="no certificate named 'somewhere'"):
        verify_chain(leaf, [root("other")[0]], [], NOW)


def test_a_ca_that_signs_leaves_counts_in_the_path_length() -> None:
    """A pathlen:0 cross-signed root over the new CA: the CA alone verifies (Go and the token
    hash see it so), but a leaf it signs does not, so with signs_leaves the CA's path fails."""
    old = root("old")
    new_key = new_ec_key()
    cross = build.signed_ca(name("new-root"), new_key.public_key(), *old, NOW, 3650, 0)
    inter = sub_ca("new-ca", (cross, new_key))
    assert verify_chain(inter[0], [old[0]], [cross], NOW) == [[inter[0], cross, old[0]]]
    with pytest.raises(ChainError, match="allows 0 intermediate CA") as caught:
        verify_chain(inter[0], [old[0]], [cross], NOW, signs_leaves=True)
    assert "which signs leaves, counts" in str(caught.value)
    with pytest.raises(ChainError, match="allows 0 intermediate CA"):
        verify_chain(leaf_of(inter), [old[0]], [inter[0], cross], NOW)


def test_find_paths_reports_a_broken_step_beside_a_good_path() -> None:
    """The new root and its pathlen:0 cross-signed copy: one path holds, the other breaks; both
    are reported, since OpenSSL follows whichever it finds first."""
    old = root("old")
    new_key = new_ec_key()
    new_root = root("new-root", new_key)
    cross = build.signed_ca(name("new-root"), new_key.public_key(), *old, NOW, 3650, 0)
    inter = sub_ca("new-ca", new_root)
    paths = find_paths(inter[0], [new_root[0], old[0]], [cross], NOW, signs_leaves=True)
    assert paths.chains == [[inter[0], new_root[0]]]
    assert paths.broken_issuers == [cross] and "allows 0" in paths.broken[0]
    # constraints are judged before times: an expired broken step is still reported
    late = find_paths(inter[0], [old[0]], [cross], NOW + timedelta(days=5000), signs_leaves=True)
    assert late.chains == [] and late.broken_issuers == [cross]
