"""The server endpoint: what it serves, what it signs, and every request it must refuse."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.ops.bootstrap import write_tokens
from rke2certd.pki import build
from rke2certd.pki.profiles import server_sans
from rke2certd.pki.token import format_token, parse_token
from rke2certd.supervisor import NODE_IP_HEADER, NODE_NAME_HEADER, NODE_PASSWORD_HEADER
from rke2certd.supervisor.server import SupervisorHandle, start

from .helpers import (
    HOST,
    ServerNode,
    basic,
    call,
    first_cert,
    make_csr,
    make_server_node,
    openssl,
    raw_exchange,
    status_of,
    tamper_signature,
    trusting,
)

KUBELET = "/v1-rke2/client-kubelet.crt"
SERVING = "/v1-rke2/serving-kubelet.crt"
OCTET = {"Content-Type": "application/octet-stream"}
Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerNode:
    """One server for the module: these tests do not change its files (counts are deltas)."""
    return make_server_node(tmp_path_factory.mktemp("endpoint") / "server")


@pytest.fixture(scope="module")
def endpoint(
    server: ServerNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SupervisorHandle]:
    store = tmp_path_factory.mktemp("endpoint-passwords") / "node-passwords.sqlite"
    with SQLiteDatastore(store) as passwords:
        handle = start(server.node, host=HOST, port=0, passwords=passwords)
        yield handle
        handle.stop()


@pytest.fixture
def signed_before(endpoint: SupervisorHandle) -> int:
    return endpoint.signed_count


def _node(name: str = "agent-1", ips: str = "10.0.0.21") -> dict[str, str]:
    """The node headers, with the node's password (each name has its own, fixed here)."""
    return {NODE_NAME_HEADER: name, NODE_IP_HEADER: ips, NODE_PASSWORD_HEADER: f"pw-of-{name}"}


def _post(
    endpoint: SupervisorHandle, server: ServerNode, path: str, body: bytes, **headers: str
) -> Any:
    hdrs = {**OCTET, **basic("node", server.password), **_node(), **headers}
    return call(endpoint.port, server.file("server-ca.crt"), "POST", path, body, hdrs)


def _leaf(body: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(body)


def _signed(events: Events) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "cert_signed"]


# What it serves ------------------------------------------------------------------------------


def test_cacerts_is_open_and_is_the_server_ca_file(endpoint: SupervisorHandle, server: ServerNode):
    ca_file = server.file("server-ca.crt")
    reply = call(endpoint.port, ca_file, "GET", "/cacerts")
    assert reply.status == 200
    assert reply.body == ca_file.read_bytes()


NEEDS_CURL = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
NEEDS_KUBECTL = pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")


@NEEDS_CURL
def test_cacerts_with_curl(endpoint: SupervisorHandle, server: ServerNode):
    """curl checks the serving cert's chain and host name (OpenSSL, independent of Python)."""
    ca_file = server.file("server-ca.crt")
    curl = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(ca_file), f"{endpoint.url}/cacerts"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout == ca_file.read_bytes()


@NEEDS_KUBECTL
def test_cacerts_with_kubectl(endpoint: SupervisorHandle, server: ServerNode):
    """kubectl is a Go client, as RKE2's agents are: Go's TLS stack accepts the endpoint."""
    ca_file = server.file("server-ca.crt")
    kubectl = subprocess.run(
        [
            "kubectl",
            f"--server={endpoint.url}",
            "--kubeconfig=/dev/null",
            "--token=unused",  # only so that kubectl does not prompt; /cacerts ignores it
            f"--certificate-authority={ca_file}",
            "get",
            "--raw",
            "/cacerts",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert kubectl.returncode == 0, kubectl.stderr
    assert kubectl.stdout.strip() == ca_file.read_bytes().strip()


def test_serving_cert_profile(endpoint: SupervisorHandle, server: ServerNode, tmp_path: Path):
    ca_file = server.file("server-ca.crt")
    with (
        socket.create_connection((HOST, endpoint.port), timeout=10) as raw,
        trusting(ca_file).wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.rfc4514_string() == "CN=rke2,O=rke2"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }
    assert names == set(server_sans(server.node.ident))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    pem = tmp_path / "serving.crt"
    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    res = openssl("verify", "-CAfile", ca_file, "-purpose", "sslserver", pem)
    assert res.returncode == 0, res.stdout + res.stderr
    # the serving key lives in memory only: no file was added to the data dir
    assert not [p for p in server.layout.data_dir.rglob("*") if "rke2certd-supervisor" in p.name]


def test_client_ca_route_needs_auth(endpoint: SupervisorHandle, server: ServerNode):
    ca_file = server.file("server-ca.crt")
    assert call(endpoint.port, ca_file, "GET", "/v1-rke2/client-ca.crt").status == 401
    reply = call(
        endpoint.port,
        ca_file,
        "GET",
        "/v1-rke2/client-ca.crt",
        None,
        basic("node", server.password),
    )
    assert reply.status == 200
    assert reply.body == server.file("client-ca.crt").read_bytes()


# What it signs -------------------------------------------------------------------------------


def test_client_kubelet_signed_from_public_key_only(
    endpoint: SupervisorHandle,
    server: ServerNode,
    events: Events,
    tmp_path: Path,
    signed_before: int,
):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, cn="system:admin", orgs=["system:masters"])  # asks for admin: ignored
    reply = _post(endpoint, server, KUBELET, csr)
    assert reply.status == 200, reply.body
    client_ca = server.file("client-ca.crt")
    assert reply.body.endswith(client_ca.read_bytes())  # leaf, then the CA bundle
    cert = _leaf(reply.body)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.rfc4514_string() == "CN=system:node:agent-1,O=system:nodes"
    (tmp_path / "leaf.crt").write_bytes(reply.body)
    res = openssl("verify", "-CAfile", client_ca, "-purpose", "sslclient", tmp_path / "leaf.crt")
    assert res.returncode == 0, res.stdout + res.stderr
    [signed] = _signed(events)
    assert signed["node_name"] == "agent-1"
    assert signed["http_path"] == KUBELET
    assert signed["cert_serial"] == format(cert.serial_number, "x")
    assert endpoint.signed_count == signed_before + 1


def test_serving_kubelet_sans_from_headers(endpoint: SupervisorHandle, server: ServerNode):
    reply = _post(endpoint, server, SERVING, make_csr(), **_node("agent-7", "10.0.0.7, fd00::7"))
    assert reply.status == 200, reply.body
    cert = _leaf(reply.body)
    assert cert.subject.rfc4514_string() == "CN=agent-7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"agent-7", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "10.0.0.7",
        "fd00::7",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.issuer == first_cert(server.file("server-ca.crt")).subject


def test_pem_csr_and_server_user_accepted(endpoint: SupervisorHandle, server: ServerNode):
    reply = _post(
        endpoint,
        server,
        "/v1-rke2/client-kube-proxy.crt",
        make_csr(pem=True),
        **basic("server", server.password),
    )
    assert reply.status == 200, reply.body
    assert _leaf(reply.body).subject.rfc4514_string() == "CN=system:kube-proxy"


def test_csr_asking_for_ca_gets_a_plain_leaf(
    endpoint: SupervisorHandle, server: ServerNode, tmp_path: Path
):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, cn="evil-ca", ca_extensions=True)
    reply = _post(endpoint, server, "/v1-rke2/client-rke2-controller.crt", csr)
    assert reply.status == 200, reply.body
    leaf = _leaf(reply.body)
    path = tmp_path / "leaf.crt"
    path.write_bytes(leaf.public_bytes(Encoding.PEM))
    text = openssl("x509", "-in", path, "-noout", "-text").stdout
    assert "CA:FALSE" in text
    assert "CA:TRUE" not in text
    assert "Certificate Sign" not in text and "CRL Sign" not in text
    assert "evil" not in text
    assert "Subject: CN = system:rke2-controller" in text
    # OpenSSL refuses a cert "issued" by it: the leaf cannot act as a CA.
    child = tmp_path / "child.crt"
    child.write_bytes(
        build.leaf(
            "victim",
            (),
            "client",
            (),
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            leaf,
            key,
            datetime.now(UTC),
        ).public_bytes(Encoding.PEM)
    )
    client_ca = server.file("client-ca.crt")
    assert openssl("verify", "-CAfile", client_ca, path).returncode == 0
    res = openssl("verify", "-CAfile", client_ca, "-untrusted", path, child)
    assert res.returncode != 0
    assert "invalid CA certificate" in res.stdout + res.stderr


def test_concurrent_signing(endpoint: SupervisorHandle, server: ServerNode, signed_before: int):
    results: list[int] = []

    def one(i: int) -> None:
        reply = _post(endpoint, server, KUBELET, make_csr(), **_node(f"node-{i}"))
        results.append(reply.status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 12
    assert endpoint.signed_count == signed_before + 12


# What it refuses -----------------------------------------------------------------------------

Case = Callable[[ServerNode], tuple[str, str, bytes | None, dict[str, str]]]


def _ed25519_csr() -> bytes:
    return make_csr(ed25519.Ed25519PrivateKey.generate())


CASES: dict[str, tuple[Case, int]] = {
    "no auth": (lambda s: ("POST", KUBELET, make_csr(), {**OCTET, **_node()}), 401),
    "wrong password": (
        lambda s: ("POST", KUBELET, make_csr(), {**basic("node", "nope"), **_node()}),
        401,
    ),
    "bearer instead of basic": (
        lambda s: ("POST", KUBELET, make_csr(), {"Authorization": f"Bearer {s.password}"}),
        401,
    ),
    "unknown user": (
        lambda s: ("POST", KUBELET, make_csr(), {**basic("admin", s.password), **_node()}),
        403,
    ),
    "server-only route, agent token": (
        lambda s: ("GET", "/v1-rke2/server-bootstrap", None, basic("node", s.password)),
        403,
    ),
    "garbage csr": (
        lambda s: (
            "POST",
            KUBELET,
            b"\x30\x82garbage" * 20,
            {**basic("node", s.password), **_node()},
        ),
        400,
    ),
    "csr signature does not verify": (
        lambda s: (
            "POST",
            KUBELET,
            tamper_signature(make_csr()),
            {**basic("node", s.password), **_node()},
        ),
        400,
    ),
    "ed25519 key": (
        lambda s: ("POST", KUBELET, _ed25519_csr(), {**basic("node", s.password), **_node()}),
        400,
    ),
    "no node name": (lambda s: ("POST", KUBELET, make_csr(), basic("node", s.password)), 400),
    "bad node name": (
        lambda s: (
            "POST",
            KUBELET,
            make_csr(),
            {**basic("node", s.password), NODE_NAME_HEADER: "Bad_Name"},
        ),
        400,
    ),
    "bad node ip": (
        lambda s: (
            "POST",
            SERVING,
            make_csr(),
            {**basic("node", s.password), **_node(ips="10.0.0.300")},
        ),
        400,
    ),
    "wrong method": (lambda s: ("GET", KUBELET, None, basic("node", s.password)), 405),
    "wrong method on cacerts": (lambda s: ("PUT", "/cacerts", b"x", {}), 405),
    "unknown route": (lambda s: ("GET", "/v1-rke2/nope", None, basic("node", s.password)), 404),
    "unknown route, no auth": (lambda s: ("POST", "/etc/passwd", b"x", {}), 404),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_and_nothing_signed(
    case: str, endpoint: SupervisorHandle, server: ServerNode, events: Events, signed_before: int
):
    build, expected = CASES[case]
    method, path, body, headers = build(server)
    reply = call(endpoint.port, server.file("server-ca.crt"), method, path, body, headers)
    assert reply.status == expected, reply.body
    if expected == 401:
        assert reply.headers["www-authenticate"] == 'Basic realm="rke2"'
    if expected == 405:
        assert reply.headers["allow"] in ("GET", "POST")
    assert endpoint.signed_count == signed_before
    assert _signed(events) == []
    refused = [e for e in events if e["event"] == "request_refused"]
    assert [e["http_status"] for e in refused] == [expected]
    assert server.password not in repr(events)


def test_missing_length_and_chunked_body(
    endpoint: SupervisorHandle, server: ServerNode, events: Events, signed_before: int
):
    auth = basic("node", server.password)["Authorization"]
    head = (
        f"POST {KUBELET} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {auth}\r\n"
        f"{NODE_NAME_HEADER}: agent-1\r\n\r\n"
    ).encode()
    assert status_of(raw_exchange(endpoint.port, server.file("server-ca.crt"), head)) == 411
    chunked = (
        f"POST {KUBELET} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {auth}\r\n"
        f"{NODE_NAME_HEADER}: agent-1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    assert status_of(raw_exchange(endpoint.port, server.file("server-ca.crt"), chunked)) == 411
    assert endpoint.signed_count == signed_before and _signed(events) == []


def test_ten_mib_body_refused_unread(
    endpoint: SupervisorHandle, server: ServerNode, events: Events, signed_before: int
):
    ca_file = server.file("server-ca.crt")
    auth = basic("node", server.password)["Authorization"]
    ten_mib = 10 * 1024 * 1024
    # 1. The length alone is enough: the server answers without waiting for the body.
    head = (
        f"POST {KUBELET} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {auth}\r\n"
        f"{NODE_NAME_HEADER}: agent-1\r\nContent-Length: {ten_mib}\r\n\r\n"
    ).encode()
    assert status_of(raw_exchange(endpoint.port, ca_file, head, timeout=5)) == 413
    # 2. A client that pushes the whole body regardless gets 413 or a reset, never a cert.
    try:
        reply = call(
            endpoint.port,
            ca_file,
            "POST",
            KUBELET,
            b"\0" * ten_mib,
            {**OCTET, "Authorization": auth, **_node()},
        )
        assert reply.status == 413
    except (OSError, http.client.HTTPException):  # reset or TLS EOF while still sending
        pass
    assert endpoint.signed_count == signed_before and _signed(events) == []
    assert call(endpoint.port, ca_file, "GET", "/cacerts").status == 200  # still serving


@NEEDS_CURL
def test_ten_mib_body_with_curl_refused_before_upload(
    endpoint: SupervisorHandle,
    server: ServerNode,
    events: Events,
    tmp_path: Path,
    signed_before: int,
):
    """curl sends `Expect: 100-continue` for a big body: the 413 comes before the upload."""
    ca_file = server.file("server-ca.crt")
    ten_mib = 10 * 1024 * 1024
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * ten_mib)
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "--cacert",
            str(ca_file),
            "-u",
            f"node:{server.password}",
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            f"{NODE_NAME_HEADER}: agent-1",
            "--data-binary",
            f"@{big}",
            f"https://{HOST}:{endpoint.port}{KUBELET}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    code, uploaded = curl.stdout.split()
    assert code == "413", curl.stderr
    assert int(uploaded) < ten_mib
    assert endpoint.signed_count == signed_before and _signed(events) == []


def test_expect_continue_refused_before_body(endpoint: SupervisorHandle, server: ServerNode):
    head = (
        f"POST {KUBELET} HTTP/1.1\r\nHost: {HOST}\r\nExpect: 100-continue\r\n"
        "Content-Length: 500\r\n\r\n"
    ).encode()
    raw = raw_exchange(endpoint.port, server.file("server-ca.crt"), head)
    assert status_of(raw) == 401  # a final answer, not "100 Continue"
    assert b"100 Continue" not in raw


def test_token_change_takes_effect_without_restart(tmp_path: Path):
    own = make_server_node(tmp_path / "server")  # its token is changed: not the shared one
    passwords = SQLiteDatastore(tmp_path / "node-passwords.sqlite")
    with passwords, start(own.node, host=HOST, port=0, passwords=passwords) as handle:
        write_tokens(own.layout, "new-password-123")
        assert _post(handle, own, KUBELET, make_csr()).status == 401
        new = _post(handle, own, KUBELET, make_csr(), **basic("node", "new-password-123"))
        assert new.status == 200


# No rollout route -----------------------------------------------------------------------------


def test_no_rollout_route(endpoint: SupervisorHandle, server: ServerNode):
    """Agents read the rollout through the cluster route: `/v1-rke2/rollout` is no route."""
    ca_file = server.file("server-ca.crt")
    reply = call(
        endpoint.port, ca_file, "GET", "/v1-rke2/rollout", None, basic("node", server.password)
    )
    assert reply.status == 404


def test_stop_closes_the_port(server: ServerNode):
    handle = start(server.node, host=HOST, port=0)
    port = handle.port
    handle.stop()
    with pytest.raises(ConnectionRefusedError):
        call(port, server.file("server-ca.crt"), "GET", "/cacerts")


def test_token_users_are_parsed_from_the_agent_token(server: ServerNode):
    token = parse_token(server.agent_token)
    assert token.username == "node" and token.password == server.password
    assert server.agent_token == format_token(token.ca_hash, "node", server.password)
