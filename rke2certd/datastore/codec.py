"""RKE2/K3s bootstrap data, bit-compatible (docs/RKE2-COMPATIBILITY.md §6). Pure: no I/O.

- key:   `/bootstrap/` + first 12 hex of SHA-256(passphrase)
- value: `<salt: 16 hex chars>:<base64(nonce ‖ AES-256-GCM ciphertext ‖ tag)>`, the key being
         PBKDF2-HMAC-SHA1(passphrase, the ASCII salt string, 4096 rounds, 32 bytes)
- plaintext: Go's `json.NewEncoder(w).Encode(map[string]File)`: keys sorted, no spaces, a
         trailing newline; `File` is `{"Timestamp": <RFC 3339 nano>, "Content": <base64>}`.
         Before timestamps, values were bare base64 strings (`map[string][]byte`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rke2certd.errors import DatastoreError, TokenError
from rke2certd.pki.join_token import AGENT_USER, SERVER_USER, parse_token
from rke2certd.pki.join_token import PREFIX as TOKEN_PREFIX

BOOTSTRAP_PREFIX: Final = "/bootstrap/"

# Field name -> path under <data>/server/ (the names of k3s's ControlRuntimeBootstrap).
BOOTSTRAP_FIELDS: Final[Mapping[str, str]] = {
    "ServerCA": "tls/server-ca.crt",
    "ServerCAKey": "tls/server-ca.key",
    "ClientCA": "tls/client-ca.crt",
    "ClientCAKey": "tls/client-ca.key",
    "RequestHeaderCA": "tls/request-header-ca.crt",
    "RequestHeaderCAKey": "tls/request-header-ca.key",
    "ETCDServerCA": "tls/etcd/server-ca.crt",
    "ETCDServerCAKey": "tls/etcd/server-ca.key",
    "ETCDPeerCA": "tls/etcd/peer-ca.crt",
    "ETCDPeerCAKey": "tls/etcd/peer-ca.key",
    "ServiceKey": "tls/service.key",
    "PasswdFile": "cred/passwd",
    "IPSECKey": "cred/ipsec.psk",
    "EncryptionConfig": "cred/encryption-config.json",
    "EncryptionHash": "cred/encryption-state.json",
}
# Only these may change through rotate-ca (upstream's `rotate:"true"` tag): the CA certs and
# keys and ServiceKey, which are exactly the fields under tls/.
ROTATABLE_FIELDS: Final = frozenset(
    name for name, path in BOOTSTRAP_FIELDS.items() if path.startswith("tls/")
)

PBKDF2_ROUNDS: Final = 4096
SALT_BYTES: Final = 8
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16

# upstream's words for a key encrypted with another token (not a secret, hence the noqa)
WRONG_TOKEN: Final = "bootstrap data already found and encrypted with a different token"  # noqa: S105
_KUBEADM_TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
_KUBEADM_REFUSED = (
    "a bootstrap-style token (<id>.<secret>) cannot protect the bootstrap data; "
    "use the server token"
)

# -- token -> key and passphrase ------------------------------------------------------------


def bootstrap_key_name(passphrase: str) -> str:
    return BOOTSTRAP_PREFIX + hashlib.sha256(passphrase.encode()).hexdigest()[:12]


def passphrase_from_token(token: str) -> str:
    """The passphrase of a server token: `K10<hash>::server:<pw>` -> `<pw>`; a bare token is
    itself. The token is parsed by `rke2certd.pki.join_token.parse_token`; this adds what the
    bootstrap data needs (the server user). Never echoes the token in an error."""
    token = token.rstrip("\n")  # as upstream reads the token file
    if not token.strip():
        raise TokenError("the server token is empty")
    if _KUBEADM_TOKEN.fullmatch(token.strip()):
        raise TokenError(_KUBEADM_REFUSED)
    try:
        parsed = parse_token(token)
    except TokenError as exc:
        creds = token.partition("::")[2]
        if creds and not creds.partition(":")[2]:
            raise TokenError("malformed token: no password after '<user>:'") from None
        raise TokenError(
            f"{exc}; a server token has the form K10<ca-hash>::server:<password>"
        ) from None
    if not token.strip().startswith(TOKEN_PREFIX):
        return parsed.password  # a bare token is the passphrase itself
    if parsed.username is None and _KUBEADM_TOKEN.fullmatch(parsed.password):
        raise TokenError(_KUBEADM_REFUSED)
    if parsed.username == AGENT_USER:
        raise TokenError(
            "this is an agent token (user 'node'); only the server token (K10<ca-hash>::server:"
            "<password>, in <data>/server/token) can decrypt the bootstrap data"
        )
    if parsed.username != SERVER_USER:
        raise TokenError(
            f"token user is '{parsed.username or ''}', but the bootstrap data needs the server "
            "token"
        )
    return parsed.password


# -- encryption -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def derive_key(passphrase: str, salt: bytes) -> bytes:
    """PBKDF2-HMAC-SHA1, 4096 rounds: cached, since a node re-reads the same value often."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), salt, PBKDF2_ROUNDS, 32)


def encrypt(
    passphrase: str, plaintext: bytes, *, salt: bytes | None = None, nonce: bytes | None = None
) -> bytes:
    """Encrypt as upstream does; `salt` (8 bytes) and `nonce` (12) are random unless given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    if len(salt) != SALT_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes and nonce {NONCE_BYTES} bytes")
    salt_hex = salt.hex().encode()  # the hex string itself is the PBKDF2 salt
    sealed = AESGCM(derive_key(passphrase, salt_hex)).encrypt(nonce, plaintext, None)
    return salt_hex + b":" + base64.b64encode(nonce + sealed)


def decrypt(passphrase: str, value: bytes) -> bytes:
    """Decrypt a bootstrap value; TokenError for the wrong token, DatastoreError for a damaged
    value."""
    if not value:
        raise DatastoreError(
            "the bootstrap key holds an empty value: another server is still creating the "
            "bootstrap data (creation lock); retry later"
        )
    salt, sep, encoded = value.partition(b":")
    if not sep:
        raise DatastoreError("the bootstrap value is damaged: not in the '<salt>:<base64>' form")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DatastoreError(f"the bootstrap value is damaged: bad base64 ({exc})") from None
    if len(data) < NONCE_BYTES + TAG_BYTES:
        raise DatastoreError(
            f"the bootstrap value is truncated: {len(data)} bytes of ciphertext, "
            f"at least {NONCE_BYTES + TAG_BYTES} expected"
        )
    try:
        aead = AESGCM(derive_key(passphrase, salt))
        return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
    except InvalidTag:
        raise TokenError(
            f"cannot decrypt the bootstrap data: {WRONG_TOKEN} (or the stored value is damaged); "
            "use the server token this cluster was created with"
        ) from None


# -- plaintext ------------------------------------------------------------------------------

# Go's zero time.Time: what upstream gives files migrated from the un-timestamped form.
GO_ZERO_TIME: Final = datetime(1, 1, 1, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)


@dataclass(frozen=True)
class BootstrapFile:
    """One file of the bootstrap data. `timestamp` is aware; `nanos` (0-999) holds the
    nanoseconds below its microsecond, so Go's nanosecond mtimes survive a round trip."""

    timestamp: datetime
    content: bytes
    nanos: int = 0

    def __post_init__(self) -> None:
        if self.timestamp.utcoffset() is None:
            raise ValueError("BootstrapFile.timestamp must be timezone-aware")
        if not 0 <= self.nanos < 1000:
            raise ValueError("BootstrapFile.nanos must be in 0..999")

    @classmethod
    def from_unix_ns(cls, unix_ns: int, content: bytes) -> BootstrapFile:
        """From a file's `st_mtime_ns`, in UTC."""
        micros, nanos = divmod(unix_ns, 1000)
        return cls(_EPOCH + timedelta(microseconds=micros), content, nanos)

    @property
    def unix_ns(self) -> int:
        return (self.timestamp - _EPOCH) // timedelta(microseconds=1) * 1000 + self.nanos


def format_go_time(ts: datetime, nanos: int = 0) -> str:
    """Go's RFC3339Nano: fraction without trailing zeros (none if zero), `Z` for offset 0."""
    offset = ts.utcoffset()
    assert offset is not None
    # not strftime: its %Y does not zero-pad years before 1000 on every libc (Go's zero time)
    text = (
        f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d}T{ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}"
    )
    frac = ts.microsecond * 1000 + nanos
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def parse_go_time(text: str) -> tuple[datetime, int]:
    """Parse RFC 3339 with up to 9 fraction digits and any offset -> (datetime, nanos)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac = int((m.group(7) or "").ljust(9, "0"))
    zone = m.group(8)
    if zone == "Z":
        tz = UTC
    else:
        sign = -1 if zone[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    micros, nanos = divmod(frac, 1000)
    return datetime(year, month, day, hour, minute, second, micros, tzinfo=tz), nanos


def encode_bootstrap(files: Mapping[str, BootstrapFile]) -> bytes:
    """The plaintext upstream writes: sorted field names, Timestamp before Content, newline."""
    parts = []
    for name in sorted(files):
        f = files[name]
        ts = json.dumps(format_go_time(f.timestamp, f.nanos))
        content = json.dumps(base64.b64encode(f.content).decode())
        parts.append(f'{json.dumps(name)}:{{"Timestamp":{ts},"Content":{content}}}')
    return ("{" + ",".join(parts) + "}\n").encode()


def decode_bootstrap(data: bytes) -> dict[str, BootstrapFile]:
    """Read either form; un-timestamped fields get Go's zero time, as upstream migrates them."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return {name: _decode_field(value) for name, value in doc.items()}
    except (ValueError, TypeError, binascii.Error) as exc:
        raise DatastoreError(
            f"the bootstrap data decrypted but is not the JSON RKE2 writes: {exc}"
        ) from None


def _decode_field(value: object) -> BootstrapFile:
    if isinstance(value, str):  # older map[string][]byte form
        return BootstrapFile(GO_ZERO_TIME, base64.b64decode(value, validate=True))
    if not isinstance(value, dict):
        raise ValueError(f"unexpected field value of type {type(value).__name__}")
    stamp = value.get("Timestamp")
    timestamp, nanos = parse_go_time(stamp) if isinstance(stamp, str) else (GO_ZERO_TIME, 0)
    content = value.get("Content") or ""
    if not isinstance(content, str):
        raise ValueError("Content is not a base64 string")
    return BootstrapFile(timestamp, base64.b64decode(content, validate=True), nanos)
