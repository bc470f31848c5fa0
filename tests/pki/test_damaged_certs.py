"""A damaged certificate is one PKIError where it is read, never an exception from deep inside a
check: cryptography parses names, extensions and keys lazily, and a flipped byte there raises
ValueError, KeyError, InvalidVersion or UnsupportedAlgorithm only when the field is first used
(the staging fuzz found one in a subject). Every single-byte change of a real CA is tried."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from rke2certd.errors import PKIError
from rke2certd.pki import certs


def _ca_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rke2-server-ca@1700000000")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _pem(der: bytes) -> bytes:
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("value", [0x00, 0x13, 0xFF])
def test_every_byte_of_a_ca_flipped_loads_whole_or_fails_as_pki_error(value: int) -> None:
    der = _ca_der()
    refused = 0
    for i in range(len(der)):
        damaged = bytearray(der)
        if damaged[i] == value:
            continue
        damaged[i] = value
        try:
            loaded = certs.load_bundle(_pem(bytes(damaged)), "server-ca.crt")
        except PKIError as exc:
            assert "server-ca.crt: certificate #1 cannot be parsed" in str(exc)
            refused += 1
            continue
        # What loads can be used by every check without a surprise.
        (cert,) = loaded
        certs.common_name(cert.subject), certs.common_name(cert.issuer), certs.is_ca(cert)
        certs.ski(cert), certs.aki(cert), certs.sans(cert), cert.public_key()
    assert refused > 0
