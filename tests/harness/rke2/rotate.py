"""The checks upstream's `certificate rotate-ca` makes before it saves a new CA set, all reported
together: a new CA bundle holds more than one cert; its first cert chains to a root of the old
bundle (old intermediates and the new bundle's other certs may be on the way); each new CA cert
matches its key; the current first service-account key is among the new ones. Fields left out
of the new set keep the current data."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

PAIRS = {
    "ServerCA": "ServerCAKey",
    "ClientCA": "ClientCAKey",
    "RequestHeaderCA": "RequestHeaderCAKey",
    "ETCDServerCA": "ETCDServerCAKey",
    "ETCDPeerCA": "ETCDPeerCAKey",
}


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


def chains_to(
    cert: x509.Certificate,
    roots: list[x509.Certificate],
    pool: list[x509.Certificate],
    depth: int = 6,
) -> bool:
    if any(_signed_by(cert, r) for r in roots):
        return True
    if depth == 0:
        return False
    return any(
        chains_to(p, roots, pool, depth - 1) for p in pool if p != cert and _signed_by(cert, p)
    )


def validate(
    current: Mapping[str, tuple[int, bytes]], new: Mapping[str, tuple[int, bytes]]
) -> list[str]:
    problems: list[str] = []
    for cert_field, key_field in PAIRS.items():
        if cert_field not in new:
            continue
        try:
            new_certs = x509.load_pem_x509_certificates(new[cert_field][1])
            old_certs = x509.load_pem_x509_certificates(current[cert_field][1])
        except (KeyError, ValueError) as exc:
            problems.append(f"{cert_field}: unreadable certificates ({exc})")
            continue
        if len(new_certs) < 2:
            problems.append(f"{cert_field}: new CA bundle must hold more than one certificate")
        roots = [c for c in old_certs if c.issuer == c.subject]
        pool = [c for c in old_certs if c.issuer != c.subject] + new_certs[1:]
        if not chains_to(new_certs[0], roots, pool):
            problems.append(f"{cert_field}: new CA does not chain to the current CA")
        key_pem = (new.get(key_field) or current.get(key_field) or (0, b""))[1]
        try:
            key = serialization.load_pem_private_key(key_pem, None)
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if key.public_key().public_bytes(*spki) != new_certs[0].public_key().public_bytes(
                *spki
            ):
                problems.append(f"{key_field}: key does not match the new CA certificate")
        except (ValueError, TypeError) as exc:
            problems.append(f"{key_field}: unreadable key ({exc})")
    if "ServiceKey" in new and "ServiceKey" in current:
        old_first = _keys(current["ServiceKey"][1])[:1]
        new_keys = _keys(new["ServiceKey"][1])
        if old_first and old_first[0] not in new_keys:
            problems.append("ServiceKey: the current signing key is not in the new set")
    return problems


def _keys(data: bytes) -> list[bytes]:
    """The public keys (DER) of every PEM private key in a file."""
    out = []
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for block in data.split(b"-----END")[:-1]:
        start = block.find(b"-----BEGIN")
        if start < 0:
            continue
        chunk = block[start:]
        kind = chunk.split(b"-----BEGIN", 1)[1].split(b"-----", 1)[0]
        text = chunk + b"-----END" + kind + b"-----\n"
        try:
            key = serialization.load_pem_private_key(text, None)
        except ValueError:
            continue
        out.append(key.public_key().public_bytes(*spki))
    return out
