"""Private keys: generation and PEM in RKE2's formats (SEC1 EC, PKCS#1 RSA)."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from rke2certd.errors import PKIError

# RKE2 uses EC keys (CAs, leaves) and RSA keys (service.key, custom roots); nothing else.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PEM_BEGIN = b"-----BEGIN "


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    """RKE2's CA and leaf keys: ECDSA P-256."""
    return ec.generate_private_key(ec.SECP256R1())


def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """RKE2's service-account key: RSA 2048 (custom root CAs: RSA 4096)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_to_pem(key: PrivateKey) -> bytes:
    """`EC PRIVATE KEY` (SEC1) or `RSA PRIVATE KEY` (PKCS#1), as RKE2 writes them."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def split_pem(data: bytes) -> list[bytes]:
    """Split a PEM file into its blocks (any type), in order."""
    blocks: list[bytes] = []
    rest = data
    while True:
        start = rest.find(PEM_BEGIN)
        if start < 0:
            return blocks
        label_end = rest.find(b"-----", start + len(PEM_BEGIN))
        if label_end < 0:
            raise PKIError("a PEM block has no complete BEGIN line")
        label = rest[start + len(PEM_BEGIN) : label_end]
        end_marker = b"-----END " + label + b"-----"
        end = rest.find(end_marker, label_end)
        if end < 0:
            raise PKIError(f"a PEM block ({label.decode(errors='replace')}) has no END line")
        blocks.append(rest[start : end + len(end_marker)] + b"\n")
        rest = rest[end + len(end_marker) :]


_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/= \t\r\n]")


def stray_bytes(data: bytes) -> tuple[int, str] | None:
    """The first byte of `data` that is neither whitespace between PEM blocks nor base64 inside
    one, as (offset, what it is), or None. A truncated block is left to the parser."""
    pos = 0
    while True:
        start = data.find(PEM_BEGIN, pos)
        outside = _NOT_SPACE.search(data, pos, len(data) if start < 0 else start)
        if outside:
            return outside.start(), _describe_byte(data, outside.start())
        if start < 0:
            return None
        label_end = data.find(b"-----", start + len(PEM_BEGIN))
        if label_end < 0:
            return None
        end_marker = b"-----END " + data[start + len(PEM_BEGIN) : label_end] + b"-----"
        end = data.find(end_marker, label_end + 5)
        if end < 0:
            return None
        inside = _NOT_BASE64.search(data, label_end + 5, end)
        if inside:
            return inside.start(), _describe_byte(data, inside.start()) + " inside a PEM block"
        pos = end + len(end_marker)


def _describe_byte(data: bytes, at: int) -> str:
    byte = data[at]
    if byte == 0:
        return "a NUL byte"
    if byte < 0x20 or byte >= 0x7F:
        return f"the byte 0x{byte:02X}"
    text = data[at : at + 32].split(b"\n", 1)[0].rstrip(b"\r")
    shown = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in text)
    return f"the text '{shown}'"


def load_keys(data: bytes, source: str | Path, *, trusted: bool = False) -> list[PrivateKey]:
    """Every private key in a PEM file (service.key holds several), with the file in errors.

    `trusted` skips OpenSSL's RSA consistency check (~35 ms a key) for keys that rke2certd made
    or that passed rotate-ca's checks; the structure is still parsed.
    """
    blocks = [b for b in pem_blocks(data, source) if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
    if not blocks:
        raise PKIError(f"{source}: no private key found (expected a PEM '... PRIVATE KEY' block)")
    keys: list[PrivateKey] = []
    for i, block in enumerate(blocks, 1):
        try:
            key = serialization.load_pem_private_key(
                block, password=None, unsafe_skip_rsa_key_validation=trusted
            )
        except (ValueError, TypeError) as exc:
            raise PKIError(f"{source}: private key #{i} cannot be parsed: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PKIError(f"{source}: key #{i} is {type(key).__name__}; only EC and RSA are used")
        keys.append(key)
    return keys


def load_key(data: bytes, source: str | Path) -> PrivateKey:
    """The first private key of a file."""
    return load_keys(data, source)[0]


def pem_blocks(data: bytes, source: str | Path) -> list[bytes]:
    try:
        blocks = split_pem(data)
    except PKIError as exc:
        raise PKIError(f"{source}: {exc} (the file is truncated or corrupt)") from exc
    if not blocks:
        raise PKIError(f"{source}: not a PEM file (no '-----BEGIN' line)")
    return blocks


def public_der(key: PrivateKey | PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER, to compare keys of any type."""
    pub = key.public_key() if isinstance(key, PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe(key: PrivateKey | PublicKeyTypes) -> str:
    """A short name of a key's type and size, for messages: 'EC P-256', 'RSA 2048'."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}.get(
            key.curve.name, f"EC {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.lstrip("_")
