"""Upstream's own `rke2 certificate rotate-ca` on a cluster where rke2certd's hook runs before
every start: the documented restarts take the new CAs (RKE2's reconcile: the datastore wins),
every hook passes, and a client that trusts only the old CA still verifies the new serving
cert in a real TLS handshake (the set is cross-signed, as upstream's example script makes it).

Run: python3 -m pytest -q -p no:cacheprovider tests/rke2/test_upstream_rotate_ca.py
"""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.certs import ec_pem, load_certs, load_key, new_ec_key, pem
from tests.harness.rke2.node import RKE2Server
from tests.harness.wait import SAFETY
from tests.rke2.conftest import Cluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

CAS = ["server-ca", "client-ca", "request-header-ca", "etcd/server-ca", "etcd/peer-ca"]


def _ca(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: object, days: int
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, True, False, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )


def cross_signed_set(tls: Path, out: Path) -> None:
    """Per CA: a new root, the same root cross-signed by the old CA, a new intermediate;
    bundle = intermediate, cross-signed root, self-signed root, old root; key = intermediate's.
    service.key = a new RSA key, then the old ones."""
    for stem in CAS:
        old = load_certs(tls / f"{stem}.crt")[0]
        old_key = load_key(tls / f"{stem}.key")
        root_key, inter_key = new_ec_key(), new_ec_key()
        root_name = f"{stem.replace('/', '-')}-root@new"
        root = _ca(
            root_name,
            root_key,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, root_name)]),
            root_key,
            7300,
        )
        cross = _ca(root_name, root_key, old.subject, old_key, 7300)
        inter = _ca(f"{stem.replace('/', '-')}-ca@new", inter_key, root.subject, root_key, 3700)
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.crt").write_bytes(pem(inter) + pem(cross) + pem(root) + pem(old))
        (out / f"{stem}.key").write_bytes(ec_pem(inter_key))
    new_sa = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (out / "service.key").write_bytes(new_sa + (tls / "service.key").read_bytes())


def _handshake(host: str, port: int, cafile: bytes) -> None:
    ctx = ssl.create_default_context(cadata=cafile.decode())
    ctx.check_hostname = False
    with (
        socket.create_connection((host, port), timeout=SAFETY) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        assert tls.version()


def _hooks_passed(node: RKE2Server) -> None:
    for res in node.hook_runs:
        assert res.returncode == 0, res.stderr


def test_upstream_rotate_ca_then_the_documented_restarts(cluster: Cluster, tmp_path: Path) -> None:
    s1 = cluster.server("s1", token="rotate-secret")
    s1.start()
    s2 = cluster.server("s2", join=s1)
    s2.start()
    old_server_ca = (s1.tls / "server-ca.crt").read_bytes()
    cross_signed_set(s1.tls, tmp_path / "rotate-ca" / "tls")
    s1.rotate_ca(tmp_path / "rotate-ca")  # checked, saved into the bootstrap key only
    new_server_ca = (tmp_path / "rotate-ca/tls/server-ca.crt").read_bytes()
    assert s1.stored_bootstrap()["ServerCA"][1] == new_server_ca
    assert (s1.tls / "server-ca.crt").read_bytes() == old_server_ca

    for node in (s1, s2):  # servers restart one by one, as upstream documents
        node.restart()  # hook first, then RKE2's reconcile: the datastore wins
        _hooks_passed(node)
        assert (node.tls / "server-ca.crt").read_bytes() == new_server_ca, node.name
        assert str(node.tls / "server-ca.crt") in node.last_written
        assert node.last_certs.get("serving-kube-apiserver") == "issuer"
        # a client that trusts only the old CA still verifies the new serving certs
        _handshake(node.host, node.apiserver_port, old_server_ca)
        _handshake(node.host, node.supervisor_port, old_server_ca)
    for node in (s1, s2):  # and the next start of each has nothing to do
        node.restart()
        _hooks_passed(node)
        assert node.last_written == [] and node.last_certs == {}, node.name
    stored = s1.stored_bootstrap()
    for field in bs.CA_FIELDS:
        assert stored[field][1] == (s2.server_dir / bs.FIELDS[field]).read_bytes(), field
