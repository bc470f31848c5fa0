"""What `ca generate-custom` (generate_custom.py), `ca stage-rotation` and `ca stage-service-key`
(stage_rotation.py) share: the result, keys and names, the hand-over to the staging dir, writes.

Facts follow the example scripts RKE2 documents (docs/RKE2-COMPATIBILITY.md §9: K3s's
contrib/util/generate-custom-ca-certs.sh and rotate-default-ca-certs.sh); the code is ours. Two
upstream flaws are not copied: the rotation bundle puts the cross-signed root before the self-signed
one (OpenSSL-based clients that trust only the old CA need that order), and the printed token hash
follows RKE2's CA-hash rule instead of being the new intermediate's fingerprint.

Every set is written with `write_files` (all or nothing); keys 0600, certs 0644, dirs 0700.
Nothing is ever written into the in-use `<data>/server/tls`, except generate-custom on a fresh
node (no CA file there yet), which is how RKE2 takes custom CAs at its first start.
Results carry tokens in fields the CLI prints; they are never logged nor put in `messages`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from rke2certd.errors import PKIError, UsageError
from rke2certd.files.atomic import FileWrite, ensure_dir, read_optional, recover, write_files
from rke2certd.files.lock import node_lock
from rke2certd.node.staged_read import current_files
from rke2certd.pki.keys import (
    PrivateKey,
    key_to_pem,
    load_keys,
    new_ec_key,
    new_rsa_key,
    pem_blocks,
)
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import (
    ROTATABLE,
    StagedFile,
    StagedSet,
    validate_staged_set,
)

KEY_TYPES = ("rsa4096", "ecdsa-p256")
CERT_MODE, KEY_MODE, DIR_MODE = 0o644, 0o600, 0o700


@dataclass(frozen=True)
class GenerateResult:
    """What a command did and what the CLI prints (messages, then the tokens if any)."""

    written: tuple[Path, ...]
    messages: tuple[str, ...]
    ca_hash: str | None = None
    backup: tuple[Path, ...] = ()  # copy these somewhere safe …
    remove: tuple[Path, ...] = ()  # … then delete these from every cluster member
    next_command: str = ""
    server_token: str | None = field(default=None, repr=False)
    agent_token: str | None = field(default=None, repr=False)


# -- generate-custom -------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: PrivateKey | None  # None: a reused root whose key stays offline


@dataclass(frozen=True)
class Signer:
    cert: x509.Certificate
    key: PrivateKey


# -- stage-rotation --------------------------------------------------------------------------


# -- stage-service-key -----------------------------------------------------------------------


# -- shared ----------------------------------------------------------------------------------


def new_key(key_type: str) -> PrivateKey:
    return new_rsa_key(4096) if key_type == "rsa4096" else new_ec_key()


def key_words(key_type: str) -> str:
    return "RSA 4096" if key_type == "rsa4096" else "EC P-256"


def cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def hand_over(out_dir: Path, staging: Path) -> str:
    """The command that gives a finished set to the daemon: a rename into its staging dir
    (the daemon takes a renamed-in dir as it is). Across file systems `mv` copies file by
    file, which the daemon must not take half-way: copy, then mark it READY last."""
    dest = staging / out_dir.name
    if _same_fs(out_dir, staging):
        return f"mv {out_dir} {dest}"
    return f"cp -a {out_dir} {dest} && touch {dest}/READY"


def _same_fs(a: Path, b: Path) -> bool:
    def dev(p: Path) -> int | None:
        for q in (p, *p.parents):
            try:
                return q.stat().st_dev
            except OSError:
                continue
        return None

    return dev(a) == dev(b)


def staging_tls(layout: Layout, out_dir: Path) -> Path:
    """out_dir/tls, refused when it is (or out_dir is) the in-use server/tls."""
    live = layout.tls.resolve()
    out_tls = (out_dir / "tls").resolve()
    if live in (out_tls, out_dir.resolve()):
        raise UsageError(
            f"refusing to stage into {live}: it holds the CAs in use, and overwriting them "
            "there would break the cluster. Stage elsewhere, e.g. "
            f"--out {layout.server / 'rotate-ca'}"
        )
    return out_tls


@contextlib.contextmanager
def maybe_locked(data_dir: Path, lock: bool) -> Iterator[None]:
    if not lock:
        yield
        return
    with node_lock(data_dir):
        yield


def require_current(layout: Layout) -> dict[str, bytes]:
    current = current_files(layout.tls)
    missing = [rel for rel in ROTATABLE if not current.get(rel)]
    if missing:
        raise PKIError(
            f"the current CA data in {layout.tls} is incomplete ({', '.join(missing)} missing or "
            "empty); nothing to cross-sign with: run on a server that has started RKE2"
        )
    return current


def self_check(files: Mapping[str, bytes], current: Mapping[str, bytes], now: datetime) -> None:
    """The staged set must pass rotate-ca's checks without --force; fail before writing."""
    staged = StagedSet({rel: StagedFile(rel, data, size=len(data)) for rel, data in files.items()})
    error = validate_staged_set(staged, current, now).error(force=False)
    if error is not None:
        raise PKIError(f"the set built would be rejected by rotate-ca, nothing written: {error}")


def write_staged(out_dir: Path, files: Mapping[str, bytes]) -> list[Path]:
    writes = [
        FileWrite(out_dir / rel, data, KEY_MODE if rel.endswith(".key") else CERT_MODE)
        for rel, data in files.items()
    ]
    return write_set(out_dir, writes)


def write_set(root: Path, writes: list[FileWrite]) -> list[Path]:
    ensure_dir(root, DIR_MODE)
    recover(root)  # finish or undo a staging run that crashed half-way
    write_files(root, writes)
    return [w.path for w in writes]


def read_service_key(path: Path) -> bytes:
    """generate-custom: a new key first, then the keys of an existing service.key."""
    old = read_optional(path)
    return prepend_service_key(old, str(path)) if old else key_to_pem(new_rsa_key(2048))


def prepend_service_key(old: bytes, source: str) -> bytes:
    """A new RSA 2048 key, then every key of `old` (checked: RSA only), as PEM blocks."""
    for i, key in enumerate(load_keys(old, source), 1):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PKIError(f"{source}: key #{i} is not RSA; service.key holds only RSA keys")
    blocks = [b for b in pem_blocks(old, source) if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
    return key_to_pem(new_rsa_key(2048)) + b"".join(blocks)
