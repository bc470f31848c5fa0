"""The stand-in server's supervisor (RKE2's port 9345) with the routes other nodes and
`rke2 certificate rotate-ca` use, and a TLS listener with the apiserver's serving cert.

- `GET /cacerts`: the server CA bundle as on disk, no auth (what joining nodes pin by hash);
- `GET /v1-rke2/server-bootstrap` (user `server`): the bootstrap files read from this node's
  disk, each with its mtime as Timestamp;
- `GET /db/info` (user `server` or `node`): the etcd members
  (`{"members": [{"ID", "name", "peerURLs", "clientURLs"}]}`);
- `POST /v1-rke2/cert/cacerts[?force=true]` (user `server`): a bootstrap JSON of the new CA
  files; checked as upstream checks it, then saved straight into the bootstrap key;
- `GET /v1-rke2/client-ca.crt` (any user); `POST /v1-rke2/<agent leaf>.crt` (user `node`,
  body a PEM CSR, header `rke2-Node-Name`): a cert signed with the public key only.
The serving cert (CN `rke2`, O `rke2`, server-ca) is made fresh at each start with the chain of
the CA file behind it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness.rke2.certs import ec_pem, load_certs, load_key, new_ec_key, pem, write_file

if TYPE_CHECKING:
    from tests.harness.rke2.node import RKE2Server

AGENT_LEAVES = {
    "client-kubelet": ("system:node:{node}", ("system:nodes",), "client", "client-ca"),
    "serving-kubelet": ("{node}", (), "server", "server-ca"),
    "client-kube-proxy": ("system:kube-proxy", (), "client", "client-ca"),
    "client-rke2-controller": ("system:rke2-controller", (), "client", "client-ca"),
}


def serving_cert(
    tls: Path, out_dir: Path, name: str, cn: str, orgs: tuple[str, ...], hosts: list[str]
) -> tuple[Path, Path]:
    """A server cert for `hosts` signed by server-ca, chained with the server-ca file."""
    ca_certs = load_certs(tls / "server-ca.crt")
    ca_key = load_key(tls / "server-ca.key")
    key = new_ec_key()
    cert = _sign(ca_certs[0], ca_key, key.public_key(), cn, orgs, "server", hosts)
    crt_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    write_file(key_path, ec_pem(key), 0o600)
    write_file(crt_path, pem(cert) + b"".join(pem(c) for c in ca_certs), 0o644)
    return crt_path, key_path


def _sign(
    ca: x509.Certificate,
    ca_key: object,
    public_key: Any,
    cn: str,
    orgs: tuple[str, ...],
    usage: str,
    hosts: list[str],
) -> x509.Certificate:
    now = datetime.now(UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - timedelta(hours=1), ca.not_valid_before_utc))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), False)
    )
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False
        )
    except x509.ExtensionNotFound:
        pass
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return builder.sign(ca_key, hashes.SHA256())


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        self.server.node.log(f"supervisor {self.command} {self.path}: " + format % args)

    def _user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            user, pw = base64.b64decode(header[6:]).decode().split(":", 1)
        except ValueError:
            return None
        return user if self.server.node.check_password(user, pw) else None

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _deny(self) -> None:
        self._send(401, b"Unauthorized\n", "text/plain")

    def do_GET(self) -> None:
        node = self.server.node
        path = self.path.split("?", 1)[0]
        if path == "/cacerts":
            self._send(200, node.tls.joinpath("server-ca.crt").read_bytes(), "text/plain")
        elif path == "/ping":
            self._send(200, b"pong", "text/plain")
        elif path == "/v1-rke2/server-bootstrap":
            if self._user() != "server":
                return self._deny()
            self._send(200, node.bootstrap_json_from_disk())
        elif path == "/db/info":
            if self._user() not in ("server", "node"):
                return self._deny()
            try:
                self._send(200, json.dumps({"members": node.etcd_members()}).encode())
            except (ConnectionError, RuntimeError) as exc:
                self._send(500, str(exc).encode(), "text/plain")
        elif path == "/v1-rke2/client-ca.crt":
            if self._user() is None:
                return self._deny()
            self._send(200, node.tls.joinpath("client-ca.crt").read_bytes(), "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        node = self.server.node
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/v1-rke2/cert/cacerts":
            if self._user() != "server":
                return self._deny()
            try:
                node.replace_cacerts(body, force="force=true" in query)
            except ValueError as exc:
                return self._send(400, (str(exc) + "\n").encode(), "text/plain")
            return self._send(200, b"", "text/plain")
        name = path.removeprefix("/v1-rke2/").removesuffix(".crt")
        if path.startswith("/v1-rke2/") and name in AGENT_LEAVES:
            if self._user() not in ("node", "server"):
                return self._deny()
            node_name = self.headers.get("rke2-Node-Name", "")
            node_ips = [i for i in self.headers.get("rke2-Node-IP", "").split(",") if i]
            try:
                csr = x509.load_pem_x509_csr(body)
            except ValueError:
                return self._send(400, b"bad CSR\n", "text/plain")
            cn, orgs, usage, ca_name = AGENT_LEAVES[name]
            hosts = [node_name, "localhost", "127.0.0.1", *node_ips] if usage == "server" else []
            ca_certs = load_certs(node.tls / f"{ca_name}.crt")
            cert = _sign(
                ca_certs[0],
                load_key(node.tls / f"{ca_name}.key"),
                csr.public_key(),
                cn.format(node=node_name),
                orgs,
                usage,
                hosts,
            )
            return self._send(200, pem(cert) + b"".join(pem(c) for c in ca_certs), "text/plain")
        self._send(404, b"not found\n", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    node: RKE2Server


def _tls_server(
    host: str, port: int, crt: Path, key: Path, handler: type[BaseHTTPRequestHandler]
) -> ThreadingHTTPServer:
    srv = _Server((host, port), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    return srv


class _Readyz(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Supervisor:
    """The supervisor (and apiserver stand-in) listeners of one running node."""

    def __init__(self, node: RKE2Server) -> None:
        self.node = node
        self.servers: list[ThreadingHTTPServer] = []
        self.threads: list[threading.Thread] = []

    def start(self, serve_apiserver: bool) -> None:
        node = self.node
        hosts = ["localhost", "127.0.0.1", node.host, node.node_name]
        run_dir = node.server_dir / "standin"
        crt, key = serving_cert(node.tls, run_dir, "supervisor", "rke2", ("rke2",), hosts)
        sup = _tls_server(node.host, node.supervisor_port, crt, key, _Handler)
        assert isinstance(sup, _Server)
        sup.node = node
        self._serve(sup)
        if serve_apiserver:
            api = node.tls / "serving-kube-apiserver"
            self._serve(
                _tls_server(
                    node.host,
                    node.apiserver_port,
                    api.with_suffix(".crt"),
                    api.with_suffix(".key"),
                    _Readyz,
                )
            )

    def _serve(self, srv: ThreadingHTTPServer, run: Callable[[], None] | None = None) -> None:
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self.servers.append(srv)
        self.threads.append(t)

    def stop(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        for t in self.threads:
            t.join(timeout=5)
        self.servers.clear()
        self.threads.clear()
