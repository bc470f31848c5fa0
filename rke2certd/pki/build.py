"""Building certificates in RKE2's profiles (docs/RKE2-COMPATIBILITY.md §2).

Every function takes `now`; none reads the clock. Serial numbers are random and positive
(upstream self-signed CAs use serial 0, which `cryptography` refuses to build).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rke2certd.pki.certs import parse_san, ski
from rke2certd.pki.keys import PrivateKey

CA_DAYS = 3650
LEAF_DAYS = 365
BACKDATE = timedelta(hours=1)

CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
EKU = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384() if key.curve.key_size <= 384 else hashes.SHA512()
    return hashes.SHA256()


def _name(cn: str, orgs: Iterable[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def self_signed_ca(
    cn: str, key: PrivateKey, now: datetime, days: int = CA_DAYS, orgs: Sequence[str] = ()
) -> x509.Certificate:
    """A root CA as RKE2 makes it: CN only, backdated 1h, `days` long, no AKI (self-signed)."""
    name = _name(cn, orgs)
    builder = _ca_builder(
        name, name, key.public_key(), now - BACKDATE, now + timedelta(days=days), None
    )
    return builder.sign(key, _hash_for(key))


def signed_ca(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    days: int,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA signed by another: an intermediate, or a root cross-signed by an older CA."""
    builder = _ca_builder(
        subject,
        issuer_cert.subject,
        public_key,
        now - BACKDATE,
        now + timedelta(days=days),
        path_length,
    )
    builder = builder.add_extension(_aki(issuer_cert, issuer_key), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _aki(issuer_cert: x509.Certificate, issuer_key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    issuer_ski = ski(issuer_cert)
    if issuer_ski is not None:
        return x509.AuthorityKeyIdentifier(issuer_ski, None, None)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def leaf(
    cn: str,
    orgs: Sequence[str],
    usage: str,
    sans: Sequence[str],
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    now: datetime,
    days: int = LEAF_DAYS,
) -> x509.Certificate:
    """A leaf as RKE2 signs it: never a CA, whatever the request asked for."""
    not_before = max(now - BACKDATE, ca_cert.not_valid_before_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, orgs))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(EKU[usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(ca_cert, ca_key), critical=False)
    )
    general: list[x509.GeneralName] = []
    for value in sans:
        kind, canon = parse_san(value)
        if kind == "ip":
            general.append(x509.IPAddress(ipaddress.ip_address(canon)))
        else:
            general.append(x509.DNSName(canon))
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(ca_key, _hash_for(ca_key))
