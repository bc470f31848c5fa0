"""RKE2's bootstrap data, as its server keeps it: the files, their JSON form, the encrypted
datastore value, and the reconcile of disk against it at start. Written from upstream's
behaviour (K3s, which RKE2 embeds), independently of rke2certd.

Facts modelled here:
- the fields and the file each one names (paths under `<data-dir>/server`);
- the JSON: field -> {"Timestamp": RFC 3339 with nanoseconds, "Content": base64 of the bytes};
  a file read from disk gets its mtime as Timestamp, a file written from the datastore gets
  its Timestamp as mtime;
- the key `/bootstrap/<first 12 hex of sha256(passphrase)>`, the value
  `<salt>:<base64(nonce|ciphertext|tag)>`, PBKDF2-HMAC-SHA1 (4096 rounds, 32 bytes) with the
  16-hex-char salt string as salt, AES-256-GCM with a 12-byte nonce;
- the reconcile: when `cred`, `tls` or `tls/etcd` is missing or empty every file is written from
  the datastore; otherwise per field a missing file is written, an equal one left, a different
  one replaced unless its mtime is 3 s or more newer than the stored Timestamp, which stops the
  start with upstream's fatal message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Field -> path under <data-dir>/server (the ones an RKE2 server without secrets-encryption has).
FIELDS: dict[str, str] = {
    "ClientCA": "tls/client-ca.crt",
    "ClientCAKey": "tls/client-ca.key",
    "ServerCA": "tls/server-ca.crt",
    "ServerCAKey": "tls/server-ca.key",
    "RequestHeaderCA": "tls/request-header-ca.crt",
    "RequestHeaderCAKey": "tls/request-header-ca.key",
    "ETCDServerCA": "tls/etcd/server-ca.crt",
    "ETCDServerCAKey": "tls/etcd/server-ca.key",
    "ETCDPeerCA": "tls/etcd/peer-ca.crt",
    "ETCDPeerCAKey": "tls/etcd/peer-ca.key",
    "ServiceKey": "tls/service.key",
    "PasswdFile": "cred/passwd",
    "IPSECKey": "cred/ipsec.psk",
}
CA_FIELDS = tuple(f for f in FIELDS if f not in ("PasswdFile", "IPSECKey"))
CERT_DIRS = ("cred", "tls", "tls/etcd")
SYSTEM_TIME_SKEW = 3  # seconds, compared on whole Unix seconds as upstream does
FATAL_SUFFIX = (
    " newer than datastore and could cause a cluster outage."
    " Remove the file(s) from disk and restart to be recreated from datastore."
)
PBKDF2_ROUNDS = 4096


class BootstrapFatal(RuntimeError):
    """The start stops here (upstream logs it at fatal level and exits)."""


@dataclass(frozen=True)
class BootstrapFile:
    timestamp: datetime
    content: bytes


Files = dict[str, BootstrapFile]


# -- time stamps ------------------------------------------------------------------------------


def format_timestamp(ns: int) -> str:
    """RFC 3339 with nanoseconds in UTC, as Go's time.Time marshals (trailing zeros dropped)."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        base += "." + f"{frac:09d}".rstrip("0")
    return base + "Z"


def parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any offset, up to 9 fraction digits)."""
    s = text.strip()
    if s.endswith("Z") or s.endswith("z"):
        s, offset = s[:-1], "+00:00"
    else:
        s, offset = s[:-6], s[-6:]
    frac_ns = 0
    if "." in s:
        s, frac = s.split(".", 1)
        frac_ns = int((frac + "000000000")[:9])
    dt = datetime.fromisoformat(s + offset)
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


# -- JSON ---------------------------------------------------------------------------------------


def encode_files(files: Mapping[str, tuple[int, bytes]]) -> bytes:
    """field -> (mtime ns, content) as the bootstrap JSON."""
    doc = {
        name: {"Timestamp": format_timestamp(ns), "Content": base64.b64encode(content).decode()}
        for name, (ns, content) in files.items()
    }
    return json.dumps(doc).encode()


def decode_files(raw: bytes) -> dict[str, tuple[int, bytes]]:
    """The bootstrap JSON as field -> (Timestamp ns, content). The pre-Timestamp format (field ->
    base64 bytes) is read with a zero time, as upstream migrates it."""
    doc = json.loads(raw)
    out: dict[str, tuple[int, bytes]] = {}
    for name, value in doc.items():
        if isinstance(value, str):
            out[name] = (0, base64.b64decode(value))
        else:
            ts = value.get("Timestamp") or "0001-01-01T00:00:00Z"
            ns = parse_timestamp_ns(ts) if not ts.startswith("0001-") else 0
            out[name] = (ns, base64.b64decode(value.get("Content") or ""))
    return out


# -- the datastore value -------------------------------------------------------------------------


def passphrase(token: str) -> str:
    """The password part of `K10<hash>::<user>:<password>` (a bare token is itself)."""
    if token.startswith("K10") and "::" in token:
        creds = token.split("::", 1)[1]
        return creds.split(":", 1)[1] if ":" in creds else creds
    return token


def bootstrap_key(token: str) -> str:
    return "/bootstrap/" + hashlib.sha256(passphrase(token).encode()).hexdigest()[:12]


def _aead_key(pw: str, salt: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha1", pw.encode(), salt.encode(), PBKDF2_ROUNDS, 32)


def encrypt(token: str, plaintext: bytes) -> bytes:
    salt = secrets.token_bytes(8).hex()
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_aead_key(passphrase(token), salt)).encrypt(nonce, plaintext, None)
    return f"{salt}:{base64.b64encode(nonce + sealed).decode()}".encode()


def decrypt(token: str, value: bytes) -> bytes:
    """Raises BootstrapFatal with upstream's wording when the token does not open it."""
    try:
        salt, b64 = value.decode().split(":", 1)
        blob = base64.b64decode(b64)
        return AESGCM(_aead_key(passphrase(token), salt)).decrypt(blob[:12], blob[12:], None)
    except Exception as exc:
        raise BootstrapFatal(
            "bootstrap data already found and encrypted with different token"
        ) from exc


# -- disk ----------------------------------------------------------------------------------------


def read_from_disk(server_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every existing bootstrap file with its mtime as Timestamp (what a server saves or serves)."""
    out: dict[str, tuple[int, bytes]] = {}
    for name, rel in FIELDS.items():
        path = server_dir / rel
        try:
            content = path.read_bytes()
            ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        out[name] = (ns, content)
    return out


def write_to_disk(server_dir: Path, files: Mapping[str, tuple[int, bytes]]) -> list[str]:
    """Write every field's file (dirs 0700, files 0600) and set its mtime to its Timestamp.
    Returns the paths written."""
    written = []
    for name, (ns, content) in files.items():
        rel = FIELDS.get(name)
        if rel is None:
            continue
        path = server_dir / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".standin-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
        os.utime(path, ns=(ns, ns))
        written.append(str(path))
    return written


def _dirs_missing(server_dir: Path) -> bool:
    for rel in CERT_DIRS:
        d = server_dir / rel
        if not d.is_dir() or not any(d.iterdir()):
            return True
    return False


@dataclass(frozen=True)
class ReconcileResult:
    written: list[str]  # paths written from the datastore
    warnings: list[str]


def reconcile(server_dir: Path, stored: Mapping[str, tuple[int, bytes]]) -> ReconcileResult:
    """Upstream's reconcile of disk against the stored bootstrap data (see the module doc).

    Raises BootstrapFatal (upstream's message) when a file differs and is 3 s or more newer
    than its stored Timestamp; nothing is written then.
    """
    if _dirs_missing(server_dir):
        return ReconcileResult(write_to_disk(server_dir, stored), [])
    newer_on_disk: list[str] = []
    update_disk = False
    warnings: list[str] = []
    for name, (ns, content) in stored.items():
        rel = FIELDS.get(name)
        if rel is None:
            warnings.append(f"Unable to lookup path to reconcile {name}")
            continue
        path = server_dir / rel
        try:
            on_disk = path.read_bytes()
        except FileNotFoundError:
            warnings.append(f"{path} doesn't exist. continuing...")
            update_disk = True
            continue
        if on_disk == content:
            continue
        disk_secs = path.stat().st_mtime_ns // 1_000_000_000
        stored_secs = ns // 1_000_000_000
        if disk_secs - stored_secs >= SYSTEM_TIME_SKEW:
            newer_on_disk.append(str(path))
        else:
            warnings.append(f"Datastore newer than {path}")
            update_disk = True
    if newer_on_disk:
        raise BootstrapFatal(", ".join(newer_on_disk) + FATAL_SUFFIX)
    written = write_to_disk(server_dir, stored) if update_disk else []
    return ReconcileResult(written, warnings)
