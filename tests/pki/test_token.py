"""Join tokens and the CA hash (docs/RKE2-COMPATIBILITY.md §7), checked with openssl + sha256."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from rke2certd.errors import TokenError
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem
from rke2certd.pki.join_token import Token, ca_hash, format_token, new_password, parse_token
from rke2certd.pki.keys import new_ec_key

H = "ab" * 32
NOW = datetime.now(UTC)


def test_parse_full_token() -> None:
    token = parse_token(f"K10{H.upper()}::server:s3cr:et\n")
    assert token == Token(H, "server", "s3cr:et")


def test_parse_short_and_bare_forms() -> None:
    assert parse_token("K10::node:pw") == Token(None, "node", "pw")
    assert parse_token("justapassword") == Token(None, None, "justapassword")
    assert parse_token("pw:with::colons") == Token(None, None, "pw:with::colons")
    assert parse_token(f"K10{H}::abcdef.0123456789abcdef") == Token(
        H, None, "abcdef.0123456789abcdef"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        f"K10{H[:-1]}::server:pw",
        f"K10{H}00::server:pw",
        f"K10{'zz' * 32}::server:pw",
        f"K10{H}::server:",
        f"K10{H}::serveronly",
        "K10abc::u:pw",
    ],
)
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(TokenError) as err:
        parse_token(text)
    assert "pw" not in str(err.value)


def test_format_round_trip_and_secrecy() -> None:
    text = format_token(H, "server", "pw123")
    assert text == f"K10{H}::server:pw123"
    assert parse_token(text) == Token(H, "server", "pw123")
    assert format_token(None, "node", "pw") == "K10::node:pw"
    token = parse_token(text)
    assert "pw123" not in repr(token) and "pw123" not in str(token)
    for bad in ((H[:10], "server", "pw"), (H, "", "pw"), (H, "a:b", "pw"), (H, "server", "")):
        with pytest.raises(TokenError):
            format_token(*bad)


def test_new_password() -> None:
    a, b = new_password(), new_password()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


def _openssl_der_sha256(pem: bytes, tmp_path: Path) -> str:
    path = tmp_path / "one.pem"
    path.write_bytes(pem)
    der = subprocess.run(
        ["openssl", "x509", "-in", path, "-outform", "DER"], capture_output=True, check=True
    ).stdout
    return hashlib.sha256(der).hexdigest()


def _sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", path], capture_output=True, check=True, text=True)
    return out.stdout.split()[0]


def test_single_cert_hashes_raw_file_bytes(tmp_path: Path) -> None:
    key = new_ec_key()
    pem = bundle_pem([build.self_signed_ca("rke2-server-ca@1", key, NOW)])
    for variant in (pem, pem + b"\n"):  # the raw bytes, trailing newline included
        (tmp_path / "ca.crt").write_bytes(variant)
        assert ca_hash(variant) == _sha256sum(tmp_path / "ca.crt")
    assert ca_hash(pem) != ca_hash(pem + b"\n")


def _cross_signed_bundle() -> tuple[list[bytes], bytes]:
    """[intermediate, cross-signed root, self-signed root, old root] as PEM blocks."""
    old_key, root_key, int_key = new_ec_key(), new_ec_key(), new_ec_key()
    old = build.self_signed_ca("old", old_key, NOW)
    root = build.self_signed_ca("new-root", root_key, NOW, days=7300)
    cross = build.signed_ca(root.subject, root_key.public_key(), old, old_key, NOW, 7300)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "new-ca")])
    inter = build.signed_ca(name, int_key.public_key(), root, root_key, NOW, 7300)
    blocks = [bundle_pem([c]) for c in (inter, cross, root, old)]
    return blocks, blocks[2]


def test_multi_cert_hashes_the_root_der(tmp_path: Path) -> None:
    blocks, root_pem = _cross_signed_bundle()
    inter, cross, root, old = blocks
    ours = ca_hash(inter + cross + root + old, NOW)
    assert ours == _openssl_der_sha256(root_pem, tmp_path)
    # Upstream's order gives the same hash (roots are tried before intermediates, as in Go).
    assert ca_hash(inter + root + cross + old, NOW) == ours
    # Upstream's script printed the intermediate's fingerprint; that is not the hash.
    assert ours != _openssl_der_sha256(inter, tmp_path)


def test_custom_topology_hashes_the_root(tmp_path: Path) -> None:
    root_key, int_key, ca_key = new_ec_key(), new_ec_key(), new_ec_key()
    root = build.self_signed_ca("root", root_key, NOW, days=7300)
    name = x509.Name
    attr = x509.NameAttribute
    inter = build.signed_ca(
        name([attr(NameOID.COMMON_NAME, "int")]), int_key.public_key(), root, root_key, NOW, 3700
    )
    ca = build.signed_ca(
        name([attr(NameOID.COMMON_NAME, "server-ca")]),
        ca_key.public_key(),
        inter,
        int_key,
        NOW,
        3700,
    )
    bundle = bundle_pem([ca, inter, root])
    assert ca_hash(bundle) == _openssl_der_sha256(bundle_pem([root]), tmp_path)


def test_unverifiable_bundle_falls_back_to_raw_bytes(tmp_path: Path) -> None:
    a = build.self_signed_ca("a", new_ec_key(), NOW)
    b = build.self_signed_ca("b", new_ec_key(), NOW)
    bundle = bundle_pem([a, b])
    (tmp_path / "b.crt").write_bytes(bundle)
    assert ca_hash(bundle) == _sha256sum(tmp_path / "b.crt")
    blocks, _ = _cross_signed_bundle()
    expired_view = b"".join(blocks)
    assert (
        ca_hash(expired_view, NOW + timedelta(days=9000))
        == hashlib.sha256(expired_view).hexdigest()
    )
