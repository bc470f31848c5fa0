"""Helpers of the monitoring tests: certificates of any validity (cryptography: openssl's CLI
cannot backdate), RKE2's kubeconfig and dynamiclistener files, and scraping the daemon."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.wait import SAFETY

T = TypeVar("T")


def make_cert(
    cn: str,
    not_before: datetime,
    not_after: datetime,
    issuer: tuple[bytes, bytes] | None = None,
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM): self-signed, or signed by `issuer` (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = name, key
    if issuer is not None:
        ca = x509.load_pem_x509_certificate(issuer[0])
        issuer_name = ca.subject
        ca_key = serialization.load_pem_private_key(issuer[1], None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        signer = ca_key
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(signer, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def days(n: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=n)


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def admin_kubeconfig(ca: bytes, cert: bytes, key: bytes, comment: str = "") -> str:
    """An rke2.yaml as RKE2 writes it (the admin cert, key and server CA embedded)."""
    return (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    certificate-authority-data: {b64(ca)}\n"
        "    server: https://127.0.0.1:6443\n"
        "  name: default\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: default\n"
        "    user: default\n"
        "  name: default\n"
        "current-context: default\n"
        "kind: Config\n"
        "preferences: {}\n"
        "users:\n"
        "- name: default\n"
        "  user:\n"
        f"    client-certificate-data: {b64(cert)}\n"
        f"    client-key-data: {b64(key)}\n"
        f"{comment}"
    )


def dynamic_cert_json(cert: bytes, key: bytes) -> str:
    """dynamiclistener's file cache: a Kubernetes TLS Secret as JSON (one line, as Go's
    json.Encoder writes it)."""
    doc = {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "rke2-serving", "namespace": "kube-system", "creationTimestamp": None},
        "data": {"tls.crt": b64(cert), "tls.key": b64(key)},
        "type": "kubernetes.io/tls",
    }
    return json.dumps(doc, separators=(",", ":")) + "\n"


# --- scraping ------------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SAFETY) as r:
        assert r.status == 200
        return str(r.read().decode())


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) of every sample called `name` in an exposition text."""
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = SAFETY) -> T:
    """fn() until it returns something (not None/False); polls a condition, never a sleep to
    sync: the deadline only ends a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
        except (OSError, AssertionError) as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(0.05)
