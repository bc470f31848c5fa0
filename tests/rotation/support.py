"""Helpers for the rotation tests: an upstream-like node made with the openssl CLI, leaves from
a staged CA, staged dirs, and the openssl checks used as an independent judge."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path

from cryptography import x509

from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, load_bundle
from rke2certd.pki.keys import key_to_pem, load_keys, new_ec_key
from rke2certd.pki.layout import CA_NAMES, Layout
from rke2certd.plan.staged_set import ROTATABLE

# RKE2's self-signed CA profile (docs/RKE2-COMPATIBILITY.md §2), serial 0 included, made by openssl
# so the "current" CAs do not come from the code under test.
_CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = v3
prompt = no
[dn]
CN = placeholder
[v3]
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign
subjectKeyIdentifier = hash
"""

CN_PREFIX = {
    "server-ca": "rke2-server-ca",
    "client-ca": "rke2-client-ca",
    "request-header-ca": "rke2-request-header-ca",
    "etcd/server-ca": "etcd-server-ca",
    "etcd/peer-ca": "etcd-peer-ca",
}


def openssl(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", *map(str, args)], input=input, capture_output=True, check=False, timeout=60
    )


def make_upstream_node(data_dir: Path, ts: int = 1700000000) -> Layout:
    """A server's tls dir as RKE2 leaves it: five P-256 self-signed CAs (serial 0), service.key."""
    layout = Layout(data_dir)
    (layout.tls / "etcd").mkdir(parents=True, exist_ok=True)
    config = data_dir / "ca.cnf"
    config.write_text(_CA_CONFIG)
    for ca in CA_NAMES:
        key, cert = layout.ca_key(ca), layout.ca_cert(ca)
        _ok(openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key))
        _ok(
            openssl(
                "req",
                "-x509",
                "-new",
                "-key",
                key,
                "-config",
                config,
                "-days",
                "3650",
                "-set_serial",
                "0",
                "-subj",
                f"/CN={CN_PREFIX[ca]}@{ts}",
                "-out",
                cert,
            )
        )
        key.chmod(0o600)
    _ok(openssl("genrsa", "-traditional", "-out", layout.service_key, "2048"))
    config.unlink()
    return layout


def _ok(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert proc.returncode == 0, proc.stderr.decode()


def install(staged_tls: Path, layout: Layout) -> None:
    """What rotate-ca + restart amount to on disk: the staged files become the node's."""
    for rel in ROTATABLE:
        src = staged_tls / rel.removeprefix("tls/")
        shutil.copyfile(src, layout.tls / rel.removeprefix("tls/"))


def issue_leaf(
    out: Path,
    ca_bundle: bytes,
    ca_key: bytes,
    now: datetime,
    usage: str = "server",
    cn: str = "kube-apiserver",
    sans: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> tuple[Path, Path]:
    """A leaf signed by the first cert of `ca_bundle`; its file is leaf + the whole bundle."""
    ca_cert = load_bundle(ca_bundle, "ca")[0]
    signer = load_keys(ca_key, "ca key")[0]
    key = new_ec_key()
    cert = build.leaf(cn, (), usage, sans, key.public_key(), ca_cert, signer, now)
    out.mkdir(parents=True, exist_ok=True)
    chain, key_path = out / f"{cn}.crt", out / f"{cn}.key"
    chain.write_bytes(bundle_pem([cert]) + ca_bundle)
    key_path.write_bytes(key_to_pem(key))
    key_path.chmod(0o600)
    return chain, key_path


def openssl_verify(trust: Path, leaf_chain: Path, work: Path, purpose: str = "sslserver") -> str:
    """`openssl verify` of the first cert of `leaf_chain`, the rest of it as -untrusted."""
    pems = leaf_chain.read_bytes()
    certs = load_bundle(pems, leaf_chain)
    leaf, untrusted = work / "verify-leaf.pem", work / "verify-untrusted.pem"
    leaf.write_bytes(bundle_pem(certs[:1]))
    untrusted.write_bytes(bundle_pem(certs[1:]))
    proc = openssl("verify", "-purpose", purpose, "-CAfile", trust, "-untrusted", untrusted, leaf)
    return (proc.stdout + proc.stderr).decode()


def first_cert(path: Path) -> x509.Certificate:
    return load_bundle(path.read_bytes(), path)[0]
