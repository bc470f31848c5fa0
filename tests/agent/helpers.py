"""Helpers of the agent tests: nodes on disk, CSRs, raw HTTPS calls, a recording HTTPS server.

Checks of results use `cryptography`, the openssl CLI, curl and kubectl, never rke2certd's own
verification code.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from rke2certd.commands.agent import agent_renew
from rke2certd.commands.agent_rollout import remote_store
from rke2certd.commands.bootstrap_write import write_tokens
from rke2certd.commands.renew import RenewResult, renew
from rke2certd.config import Config
from rke2certd.datastore.base import Datastore
from rke2certd.files.lock import LOCK_NAME, node_lock
from rke2certd.node.node import Node
from rke2certd.pki import build, certs, keys
from rke2certd.pki.join_token import new_password
from rke2certd.plan.rollout import Member, Phase, Registration
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.fleet_limits import MIN_HOME
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle, start
from tests.harness.wait import SAFETY

# the clock of the cluster-route tests: their servers' housekeeping and their records
NOW = datetime(2030, 1, 2, tzinfo=UTC)

HOST = "127.0.0.1"


# Nodes ---------------------------------------------------------------------------------------


@dataclass
class ServerNode:
    node: Node
    password: str

    @property
    def layout(self) -> Any:
        return self.node.layout

    @property
    def agent_token(self) -> str:
        return (self.node.layout.server / "agent-token").read_text().strip()

    def file(self, rel: str) -> Path:
        return self.node.layout.tls / rel


def make_server_node(data: Path, name: str = "server-1", ip: str = "10.0.0.11") -> ServerNode:
    cfg = Config.from_mapping({"data-dir": str(data), "node-name": name, "node-ip": [ip]})
    node = Node.from_config(cfg)
    with node_lock(data, 30):
        renew(node, datetime.now(UTC))
    password = new_password()
    write_tokens(node.layout, password)
    return ServerNode(node, password)


def make_agent_node(data: Path, token: str, name: str = "agent-1", **config: Any) -> Node:
    doc: dict[str, Any] = {
        "data-dir": str(data),
        "roles": ["agent"],
        "node-name": name,
        "node-ip": ["10.0.0.21"],
        "server": "https://127.0.0.1:9345",
        "token": token,
        # beside the data dir (never the host's /etc/rancher), out of the dir's snapshots
        "node-password-file": str(data.parent / f"{data.name}.node-password"),
    }
    doc.update({k.replace("_", "-"): v for k, v in config.items()})
    return Node.from_config(Config.from_mapping(doc))


def renew_agent(node: Node, **kwargs: Any) -> RenewResult:
    """As the CLI runs it: under the node lock, at the real time."""
    with node_lock(node.layout.data_dir, 30):
        return agent_renew(node, datetime.now(UTC), **kwargs)


def agent_on(
    port: int, server: ServerNode, agent_factory: Callable[..., Node], name: str
) -> tuple[Node, RemoteDatastore]:
    """An agent-only node of the endpoint at `port`, renewed through it (the server CA on disk,
    pinned by the token), and its coordination keys through that endpoint."""
    node = agent_factory(name, supervisor_port=port)
    renew_agent(node)
    return node, remote_store(node, lambda: server.agent_token)


def start_cluster_endpoint(
    server: ServerNode, store: Datastore, port: int | None = 0, home: int = MIN_HOME
) -> SupervisorHandle:
    """`server`'s endpoint on HOST with the cluster route on `store`, its clock at NOW (`port`
    None: the node's supervisor-port; 0: any free one)."""
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout), home=home)
    return start(server.node, host=HOST, port=port, cluster=api)


def register_agent(remote: RemoteDatastore, name: str, ttl: int) -> tuple[ClusterStore, int]:
    """Its membership and registration (phase agent), on a new lease of `ttl` seconds."""
    cs = ClusterStore(remote)
    lease = remote.grant_lease(ttl)
    cs.ensure_member(Member(name, ("agent",), Phase.AGENT))
    cs.register(Registration(name, ("agent",), Phase.AGENT, "t", None), lease)
    return cs, lease


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: bytes, mode, mtime_ns (the node lock is runtime state)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != LOCK_NAME:
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mode & 0o7777, st.st_mtime_ns)
    return out


def public_key_der(path: Path) -> bytes:
    return keys.public_der(keys.load_key(path.read_bytes(), path))


def first_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# CSRs ----------------------------------------------------------------------------------------


def make_csr(
    key: Any = None,
    *,
    cn: str = "whatever",
    orgs: Iterable[str] = (),
    ca_extensions: bool = False,
    pem: bool = False,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if ca_extensions:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
        )
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, digest)
    return csr.public_bytes(Encoding.PEM if pem else Encoding.DER)


def tamper_signature(der: bytes) -> bytes:
    """Flip the lowest bit of the last byte: inside the signature, the DER stays well formed."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# HTTPS calls ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


def trusting(cafile: Path) -> ssl.SSLContext:
    """A client that checks the chain AND the host name (stricter than the agent's client)."""
    return ssl.create_default_context(cafile=str(cafile))


def call(
    port: int,
    cafile: Path,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    conn = http.client.HTTPSConnection(HOST, port, timeout=SAFETY, context=trusting(cafile))
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_exchange(port: int, cafile: Path, head: bytes, timeout: float = 10) -> bytes:
    """Send exactly `head` (request line + headers, maybe a body) and read until the server
    closes; for requests http.client will not make (no length, a length with no body)."""
    with (
        socket.create_connection((HOST, port), timeout=timeout) as raw,
        trusting(cafile).wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(head)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


# A plain HTTPS server that records every request (the server of another cluster) -----------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class RecordingServer:
    """HTTPS with a cert from its own CA; `/cacerts` answers `cacerts` (default: its own CA)."""

    directory: Path
    cacerts: bytes | None = None
    host: str = HOST
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        ca_key, key = keys.new_ec_key(), keys.new_ec_key()
        ca = build.self_signed_ca("rke2-server-ca@1", ca_key, now)  # same CN as a real one
        sans = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "localhost")
        cert = build.leaf("rke2", ("rke2",), "server", sans, key.public_key(), ca, ca_key, now)
        self.ca_pem = certs.bundle_pem([ca])
        (self.directory / "ca.crt").write_bytes(self.ca_pem)
        (self.directory / "tls.crt").write_bytes(certs.bundle_pem([cert, ca]))
        (self.directory / "tls.key").write_bytes(keys.key_to_pem(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.directory / "tls.crt", self.directory / "tls.key")
        self._server = _Recorder((self.host, self.port), self)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def answer(self, path: str) -> bytes:
        return (self.cacerts or self.ca_pem) if path == "/cacerts" else b"ok\n"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: RecordingServer) -> None:
        self.owner = owner
        super().__init__(address, _RecordingHandler)


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.owner.requests.append(
            Recorded(self.command, self.path, {k: v for k, v in self.headers.items()})
        )
        body = self.server.owner.answer(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass
