"""The default health gate after a restart, in Python's `ssl` (no openssl, no curl):

- etcd role: etcd's `/health` with the node's etcd client cert, and a TLS handshake to etcd's
  client port checking that it serves `etcd/server-client.crt` as it is on disk now;
- control-plane role: the apiserver's `/readyz` with the admin client cert, and a handshake
  checking that it serves `serving-kube-apiserver.crt` as on disk now;
- agent-only nodes: a handshake to the kubelet's TLS port (10250) with `client-kubelet`,
  checking that it serves `agent/serving-kubelet.crt` as on disk now.

Checking the served certificate is what proves the restart took the new files: a service that
is healthy but still serves the old certificate was not restarted (or reloaded) at all.
Probes run in phase order (etcd first), as a multi-role node's work is ordered.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from rke2certd.config import Role
from rke2certd.errors import PKIError
from rke2certd.node.node import Node
from rke2certd.pki.certs import load_bundle

BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Probe:
    name: str
    run: Callable[[float], str | None]  # timeout -> None when healthy, else what is wrong


def default_probes(node: Node) -> list[Probe]:
    cfg, tls = node.cfg, node.layout.tls
    probes: list[Probe] = []
    if Role.ETCD in cfg.roles:
        probes += _pair(
            "etcd",
            etcd_health,
            cfg.health_etcd_endpoint,
            tls / "etcd/server-ca.crt",
            tls / "etcd/client.crt",
            tls / "etcd/client.key",
            tls / "etcd/server-client.crt",
        )
    if Role.CONTROL_PLANE in cfg.roles:
        probes += _pair(
            "apiserver",
            readyz,
            cfg.health_apiserver_endpoint,
            tls / "server-ca.crt",
            tls / "client-admin.crt",
            tls / "client-admin.key",
            tls / "serving-kube-apiserver.crt",
        )
    if not cfg.is_server:  # an agent-only node: the kubelet (servers' agents restart with them)
        agent = node.layout.agent
        probes.append(
            Probe(
                "kubelet serves the new serving-kubelet.crt",
                partial(
                    served_cert,
                    cfg.health_kubelet_endpoint,
                    node.layout.agent_server_ca,
                    agent / "serving-kubelet.crt",
                    agent / "client-kubelet.crt",
                    agent / "client-kubelet.key",
                ),
            )
        )
    return probes


HealthCheck = Callable[[str, Path, Path, Path, float], str | None]


def _pair(
    what: str, check: HealthCheck, url: str, ca: Path, cert: Path, key: Path, serving: Path
) -> list[Probe]:
    """The service's own health endpoint, then the served-certificate check."""
    path = "/health" if check is etcd_health else "/readyz"
    return [
        Probe(f"{what} {path}", partial(check, url, ca, cert, key)),
        Probe(
            f"{what} serves the new {serving.name}",
            partial(served_cert, url, ca, serving, cert, key),
        ),
    ]


def run_probes(probes: list[Probe], timeout: float) -> list[str]:
    """Every probe once, in order; the problems found (empty: healthy)."""
    problems = []
    for p in probes:
        problem = p.run(timeout)
        if problem:
            problems.append(f"{p.name}: {problem}")
    return problems


# -- probes ------------------------------------------------------------------------------------


def _context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def _get(url: str, path: str, ctx: ssl.SSLContext, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=ctx, timeout=timeout
    )
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(BODY_LIMIT)
    finally:
        conn.close()


def _failure(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


def etcd_health(url: str, ca: Path, cert: Path, key: Path, timeout: float) -> str | None:
    try:
        status, body = _get(url, "/health", _context(ca, cert, key), timeout)
        doc = json.loads(body or b"{}")
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        return _failure(exc)
    if status != 200 or not isinstance(doc, dict) or doc.get("health") != "true":
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    return None


def readyz(url: str, ca: Path, cert: Path, key: Path, timeout: float) -> str | None:
    try:
        status, body = _get(url, "/readyz", _context(ca, cert, key), timeout)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return _failure(exc)
    if status != 200:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    return None


def served_cert(
    url: str, ca: Path, expected: Path, cert: Path | None, key: Path | None, timeout: float
) -> str | None:
    """None when the endpoint serves (and chains to `ca`) the first certificate of `expected`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    try:
        want = load_bundle(expected.read_bytes(), expected)[0]
    except (OSError, PKIError) as exc:
        return f"cannot read {expected}: {exc}"
    try:
        ctx = _context(ca, cert, key)
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return _failure(exc)
    if der == want.public_bytes(Encoding.DER):
        return None
    got = x509.load_der_x509_certificate(der) if der else None
    served = f"serial {got.serial_number:x}" if got else "nothing"
    return (
        f"{host}:{port} serves {served}, not {expected.name} (serial {want.serial_number:x}): "
        "the service has not loaded the new certificate"
    )
