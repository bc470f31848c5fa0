"""Reading certificates: PEM bundles with the file named in errors, and the facts we compare."""

from __future__ import annotations

import ipaddress
import warnings
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rke2certd.errors import PKIError
from rke2certd.pki.keys import pem_blocks, public_der

_E = TypeVar("_E", bound=x509.ExtensionType)


def load_bundle(data: bytes, source: str | Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file, in order; any other PEM block is an error."""
    certs: list[x509.Certificate] = []
    for i, block in enumerate(pem_blocks(data, source), 1):
        first = block.split(b"\n", 1)[0]
        if b"PRIVATE KEY" in first:
            raise PKIError(f"{source}: block #{i} is a private key where a certificate belongs")
        if b"CERTIFICATE" not in first:
            label = first.decode(errors="replace").strip("- ")
            raise PKIError(f"{source}: block #{i} is '{label}', not a certificate")
        try:
            with warnings.catch_warnings():
                # Upstream CAs have serial 0, which cryptography warns about on load.
                warnings.simplefilter("ignore")
                cert = x509.load_pem_x509_certificate(block)
                _parse_all(cert)
        except Exception as exc:  # hostile bytes raise more kinds than ValueError
            raise PKIError(
                f"{source}: certificate #{i} cannot be parsed: {type(exc).__name__}: {exc}"
            ) from exc
        certs.append(cert)
    return certs


def _parse_all(cert: x509.Certificate) -> None:
    """cryptography parses names, extensions and the key only when asked, and a damaged one
    then raises ValueError, KeyError, InvalidVersion or UnsupportedAlgorithm deep inside a
    check: ask for each here, so that a bad certificate is one clear error where it is read."""
    _ = (cert.subject, cert.issuer, cert.extensions, cert.signature_hash_algorithm)
    _ = (cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)
    cert.public_key()


def bundle_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def organizations(name: x509.Name) -> tuple[str, ...]:
    return tuple(str(a.value) for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))


def _ext(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def ski(cert: x509.Certificate) -> bytes | None:
    ext = _ext(cert, x509.SubjectKeyIdentifier)
    return ext.digest if ext else None


def aki(cert: x509.Certificate) -> bytes | None:
    ext = _ext(cert, x509.AuthorityKeyIdentifier)
    return ext.key_identifier if ext else None


def is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return bool(bc and bc.ca)


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses as canonical text) of a certificate."""
    ext = _ext(cert, x509.SubjectAlternativeName)
    if ext is None:
        return set(), set()
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def usages(cert: x509.Certificate) -> list[str]:
    """Usages in `rke2 certificate check` words: CertSign, ServerAuth, ClientAuth."""
    out: list[str] = []
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and ku.key_cert_sign:
        out.append("CertSign")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        if ExtendedKeyUsageOID.SERVER_AUTH in eku:
            out.append("ServerAuth")
        if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
            out.append("ClientAuth")
    return out


def not_before(cert: x509.Certificate) -> datetime:
    return cert.not_valid_before_utc


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


def key_matches(cert: x509.Certificate, key_public_der: bytes) -> bool:
    return public_der(cert.public_key()) == key_public_der


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def serial_hex(cert: x509.Certificate) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream CAs have serial 0; reading it warns
        return format(cert.serial_number, "x")


def parse_san(value: str) -> tuple[str, str]:
    """('ip', canonical) when `value` parses as an IP, else ('dns', value)."""
    try:
        return "ip", str(ipaddress.ip_address(value))
    except ValueError:
        return "dns", value
