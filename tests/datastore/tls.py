"""A tiny etcd PKI for the datastore tests and the benchmark, built with rke2certd.pki.build.

Mirrors RKE2's etcd certs: a server CA, a server cert that also allows client auth (like
`etcd/server-client.crt`) used for serving and peering, and a client cert (like
`etcd/client.crt`). `foreign_server` serves with a cert from an unrelated CA (`foreign_ca`) but
still trusts our client certs, to prove that a client refuses a server it should not trust (its
`ca` holds both CAs: etcd's gRPC gateway dials etcd itself and must trust its own cert).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rke2certd.pki.build import leaf, self_signed_ca
from rke2certd.pki.keys import PrivateKey, key_to_pem, new_ec_key
from tests.harness.etcd import TLSFiles

SERVER_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class EtcdPKI:
    server: TLSFiles  # ca = the etcd server CA
    client: TLSFiles
    foreign_server: TLSFiles  # cert from foreign_ca; ca = both CAs
    foreign_ca: Path


def _write(path: Path, cert: x509.Certificate, key: PrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(key_to_pem(key))
    key_path.chmod(0o600)


def _ca(directory: Path, name: str, now: datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = new_ec_key()
    cert = self_signed_ca(f"{name}@{int(now.timestamp())}", key, now)
    _write(directory / name, cert, key)
    return cert, key


def _leaf(
    directory: Path,
    name: str,
    usage: str,
    sans: tuple[str, ...],
    ca: tuple[x509.Certificate, PrivateKey],
    now: datetime,
) -> None:
    key = new_ec_key()
    cert = leaf(name, (), usage, sans, key.public_key(), ca[0], ca[1], now)
    _write(directory / name, cert, key)


def make_etcd_pki(directory: Path) -> EtcdPKI:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca = _ca(directory, "etcd-server-ca", now)
    other = _ca(directory, "other-ca", now)
    _leaf(directory, "etcd-server", "both", SERVER_SANS, ca, now)
    _leaf(directory, "etcd-client", "client", (), ca, now)
    _leaf(directory, "other-server", "both", SERVER_SANS, other, now)

    def files(name: str, ca: str = "etcd-server-ca.crt") -> TLSFiles:
        return TLSFiles(directory / ca, directory / f"{name}.crt", directory / f"{name}.key")

    both = (directory / "etcd-server-ca.crt").read_bytes() + (
        directory / "other-ca.crt"
    ).read_bytes()
    (directory / "both-ca.crt").write_bytes(both)

    return EtcdPKI(
        server=files("etcd-server"),
        client=files("etcd-client"),
        foreign_server=files("other-server", "both-ca.crt"),
        foreign_ca=directory / "other-ca.crt",
    )
