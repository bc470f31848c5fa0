"""Join tokens and the CA hash that pins them to the cluster CA (docs/RKE2-COMPATIBILITY.md §7).

A token is a secret: nothing here logs it, and no error message quotes it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from rke2certd.errors import PKIError, TokenError
from rke2certd.pki.certs import load_bundle
from rke2certd.pki.chain import der, is_root_like, verify_chain

PREFIX = "K10"
HASH_HEX_LEN = 64
SERVER_USER = "server"
AGENT_USER = "node"
_HEX = re.compile(r"[0-9a-fA-F]*")
# kubeadm-style bootstrap token (`<id>.<secret>`), which agents may join with instead of user:pw.
_BOOTSTRAP = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")


@dataclass(frozen=True)
class Token:
    """A parsed join token. `username` is None for a bare password (no CA pinning)."""

    ca_hash: str | None
    username: str | None
    password: str = field(repr=False)

    def __str__(self) -> str:
        return "<token>"  # never print the secret by accident


def parse_token(s: str) -> Token:
    """`K10<hash>::<user>:<password>`, `K10::<user>:<password>`, or a bare password.

    Follows upstream's parser (a bare token is itself the password); the hash, when present,
    must be 64 hex characters and is returned lowercased. A kubeadm bootstrap token
    (`abcdef.0123456789abcdef`) in place of `<user>:<password>` is returned as the password
    with no user.
    """
    text = s.strip()
    if not text:
        raise TokenError("the token is empty")
    if not text.startswith(PREFIX):
        return Token(None, None, text)
    rest = text[len(PREFIX) :]
    ca_hash: str | None = None
    if "::" in rest:
        digest, rest = rest.split("::", 1)
        _check_hash(digest)
        ca_hash = digest.lower() or None
    if _BOOTSTRAP.fullmatch(rest):
        return Token(ca_hash, None, rest)
    user, sep, password = rest.partition(":")
    if not sep or not password:
        raise TokenError(
            "the token is malformed: expected K10<ca-hash>::<user>:<password> "
            "(the token itself is not shown)"
        )
    return Token(ca_hash, user or None, password)


def _check_hash(digest: str) -> None:
    if len(digest) not in (0, HASH_HEX_LEN):
        raise TokenError(
            f"the token's CA hash has {len(digest)} characters; it must be empty or "
            f"{HASH_HEX_LEN} hex characters (a SHA-256). Copy the whole token from server/token"
        )
    if not _HEX.fullmatch(digest):
        raise TokenError("the token's CA hash is not hexadecimal; copy the whole token again")


def format_token(ca_hash: str | None, user: str, password: str) -> str:
    """The full token, `K10<hash>::<user>:<password>` (`K10::…` without a hash)."""
    digest = ca_hash or ""
    _check_hash(digest)
    if not user or ":" in user:
        raise TokenError("a token user must be non-empty and contain no ':'")
    if not password:
        raise TokenError("a token password must not be empty")
    return f"{PREFIX}{digest.lower()}::{user}:{password}"


def ca_hash(bundle: bytes, now: datetime | None = None, source: str = "server-ca.crt") -> str:
    """The CA hash of a `server-ca.crt` bundle, as RKE2 agents compute it when they join.

    One certificate: SHA-256 of the file's raw bytes. Several: verify the first against the
    bundle's other root-like certificates (no AKI, or AKI = SKI; upstream's test, which every
    self-signed CA passes) with the rest as intermediates, and hash the DER of the root ending
    the first chain found (Go's order); if nothing verifies, the raw bytes again. Pass `now` to
    check validity as agents do (Go verifies at the current time). Not the fingerprint of the
    first certificate: upstream's cross-sign script prints that, and agents reject it.
    """
    certs = load_bundle(bundle, source)
    if len(certs) > 1:
        others = certs[1:]
        roots = [c for c in others if is_root_like(c)]
        intermediates = [c for c in others if not is_root_like(c)]
        try:
            chains = verify_chain(certs[0], roots, intermediates, now)
        except PKIError:
            pass
        else:
            return hashlib.sha256(der(chains[0][-1])).hexdigest()
    return hashlib.sha256(bundle).hexdigest()


def new_password() -> str:
    """A fresh token password: 32 hex characters (128 random bits), as RKE2 makes them."""
    return secrets.token_hex(16)
