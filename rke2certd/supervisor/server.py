"""The HTTPS endpoint servers run for agents: `/cacerts`, the CSR routes, the rollout state.

TLS. The serving cert (CN `rke2`, O `rke2`, server auth, the server SANs, EC P-256, 365 days)
is issued from server-ca at start and kept in memory only: it reaches OpenSSL through an
anonymous memfd, so no key file is added beside RKE2's and nothing needs cleaning up. Agents pin
the CA (by the token's hash), not this cert, so a fresh one per start costs nothing. The CA
files are checked by stat signature at each connection: after a renew or CA rotation rewrites
them, the next connection gets a cert, a bundle and a signer from the new files, with no restart
(a set caught half-renamed fails to load and the previous snapshot stays until it is whole).

Signing. Only the CSR's public key is used, after its signature verifies; its subject and every
extension it asks for are ignored. CN, O, EKU and SANs come from the route
(docs/RKE2-COMPATIBILITY.md §4) and the node headers, and `build.leaf` never makes a CA. The reply
is the leaf then the CA bundle.

Authentication is basic auth, compared in constant time with the passwords of the server's
tokens, read at each request so that a token change takes effect at once. The agent token's
password (`<data>/server/agent-token`, else the configured token) grants the agent routes, as
user `node` or `server`; the server token's password (`<data>/server/token`, else the configured
token) with user `server` also grants RKE2's server-only routes (which answer 501: RKE2's own
supervisor serves them). A valid agent credential on a server-only route is 403. Requests that
act as a node (the kubelet CSR routes, the cluster route) must also prove the node's name with
its node password (`node_auth.py`), and a server's name is never an agent's.

Checks run in order route (404), method (405), credentials (401/403), headers, body length
(411/413), then the body is read; the first four also answer `Expect: 100-continue`, so a
refused client never sends its body. Then the node (400/403), the CSR and its names (400/403).
Every refusal is logged (`request_refused`) without credentials; every signature is logged
(`cert_signed`).

Limits (`limits.py`, constants in `rke2certd.supervisor`): a deadline for handshake, headers and
body together; unauthenticated connections capped in total and per source address, so that
authenticated agents keep places of their own; JSON nesting bounded before parsing; one request
per connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import os
import re
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rke2certd.clock import Clock, system_clock
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.files.atomic import read_optional
from rke2certd.files.exposure import warn_if_exposed
from rke2certd.log import log, notify
from rke2certd.node.bootstrap_data import configured_token
from rke2certd.node.ca_material import CA, load_ca_set
from rke2certd.node.node import Node
from rke2certd.pki import build, certs, keys
from rke2certd.pki.join_token import parse_token
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import LeafSpec, NodeIdentity, SanSet, server_sans, wanted_sans
from rke2certd.supervisor import (
    AGENT_USER,
    CACERTS_PATH,
    CERT_ROUTES,
    CLIENT_CA_PATH,
    CLUSTER_PATH,
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    MAX_CSR_BYTES,
    MAX_JSON_DEPTH,
    MAX_PER_ADDRESS,
    MAX_UNAUTHENTICATED,
    NODE_IP_HEADER,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    REQUEST_DEADLINE,
    ROLLOUT_PATH,
    ROUTE_PREFIX,
    SERVER_CA_PATH,
    SERVER_USER,
    wire,
)
from rke2certd.supervisor.cluster_api import ClusterAPI, ClusterRefused
from rke2certd.supervisor.limits import ConnectionGate, Refusal, Ticket
from rke2certd.supervisor.node_auth import NodePasswords, NodeRefused, SanPolicy, refused_sans

TLS_DAYS = 365
TLS_REISSUE_BEFORE = timedelta(days=30)  # a daemon up for a year gets a fresh serving cert
IO_TIMEOUT = 15.0  # per socket operation: a stalled client must not hold a thread forever
MAX_NODE_IPS = 16
LINGER_SECONDS = 1.0
FLOOD_LOG_SECONDS = 1.0
PEM_TYPE = "application/x-pem-file"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="rke2"'}
# Kubernetes node names are RFC 1123 subdomains.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RSA_MIN_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class Caller:
    """Who made an authenticated request: token user, node name header (validated), address."""

    user: str
    node_name: str | None
    remote_addr: str


# Given the caller, the JSON document GET /v1-rke2/rollout returns (the daemon supplies it).
RolloutProvider = Callable[[Caller], Mapping[str, Any]]


def _no_rollout(_caller: Caller) -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True)
class _Route:
    method: str
    role: str | None  # None: open; AGENT_USER: node or server token; SERVER_USER: servers only
    kind: str


_ROUTES: dict[str, _Route] = {
    CACERTS_PATH: _Route("GET", None, "server-ca"),
    SERVER_CA_PATH: _Route("GET", AGENT_USER, "server-ca"),
    CLIENT_CA_PATH: _Route("GET", AGENT_USER, "client-ca"),
    ROLLOUT_PATH: _Route("GET", AGENT_USER, "rollout"),
    CLUSTER_PATH: _Route("POST", AGENT_USER, "cluster"),
    **{path: _Route("POST", AGENT_USER, "sign") for path in CERT_ROUTES},
    # RKE2's server-only routes: known so that an agent token gets 403; never served here.
    f"{ROUTE_PREFIX}/server-bootstrap": _Route("GET", SERVER_USER, "not-served"),
    f"{ROUTE_PREFIX}/token": _Route("PUT", SERVER_USER, "not-served"),
    f"{ROUTE_PREFIX}/cert/cacerts": _Route("POST", SERVER_USER, "not-served"),
    f"{ROUTE_PREFIX}/encrypt/status": _Route("GET", SERVER_USER, "not-served"),
    f"{ROUTE_PREFIX}/encrypt/config": _Route("PUT", SERVER_USER, "not-served"),
}
ROUTES = frozenset(_ROUTES)  # the metrics' route label: these, or `other`


class _Refused(Exception):
    """An HTTP error answer; raised anywhere in a request, sent and logged by the handler."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


# TLS material ------------------------------------------------------------------------------

Stamp = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class _Material:
    """One consistent snapshot: the CAs that sign, and a TLS context serving from server-ca."""

    stamp: Stamp
    cas: dict[str, CA]
    context: ssl.SSLContext
    tls_not_after: datetime


def _stamp(layout: Layout) -> Stamp:
    out: list[tuple[int, int, int] | None] = []
    for name in ("server-ca", "client-ca"):
        for path in (layout.ca_cert(name), layout.ca_key(name)):
            try:
                st = path.stat()
            except OSError:
                out.append(None)
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from, without the bytes touching a disk."""
    fd = os.memfd_create("rke2certd-supervisor", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with _memfile(chain_pem) as cert_path, _memfile(key_pem) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:  # e.g. no /proc in this mount namespace
        raise Rke2certdError(f"cannot load the endpoint's serving certificate: {exc}") from exc
    return context


def _load_material(node: Node, now: datetime) -> _Material:
    stamp = _stamp(node.layout)  # before reading: a change during the load shows up next time
    cas = load_ca_set(node.layout).cas
    server_ca = cas["server-ca"]
    key = keys.new_ec_key()
    cert = build.leaf(
        "rke2", ("rke2",), "server", server_sans(node.ident), key.public_key(),
        server_ca.cert, server_ca.key, now, TLS_DAYS,
    )  # fmt: skip
    context = _server_context(certs.bundle_pem([cert]) + server_ca.bundle, keys.key_to_pem(key))
    return _Material(stamp, cas, context, certs.not_after(cert))


def _token_password(node: Node, name: str) -> str | None:
    saved = read_optional(node.layout.server / name)
    if saved:
        warn_if_exposed(node.layout.server / name, f"the {name} file")
    text = saved.decode().strip() if saved else configured_token(node.cfg, node.layout)
    return parse_token(text).password if text else None


def agent_password(node: Node) -> str | None:
    """The password agents must send: `server/agent-token`'s, else the configured token's."""
    return _token_password(node, "agent-token")


def server_password(node: Node) -> str | None:
    """The server token's password: `server/token`'s, else the configured token's."""
    return _token_password(node, "token")


def _san_policy(node: Node) -> SanPolicy:
    cfg = node.cfg
    return SanPolicy(cfg.cluster_domain, tuple(cfg.service_cidr), server_sans(node.ident))


# Request parsing (pure helpers) ------------------------------------------------------------


def _same(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _basic_credentials(header: str | None) -> tuple[str, str]:
    if not header:
        raise _Refused(401, "credentials required (basic auth node:<password>)", CHALLENGE)
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise _Refused(401, "only basic auth is accepted", CHALLENGE)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _Refused(401, "malformed basic auth credentials", CHALLENGE) from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise _Refused(401, "malformed basic auth credentials", CHALLENGE)
    return user, password


def _node_name(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    name = value.strip()
    if len(name) > 253 or not _NODE_NAME.fullmatch(name):
        raise _Refused(400, f"{NODE_NAME_HEADER} is not a valid node name (RFC 1123, lowercase)")
    return name


def _node_ips(value: str | None) -> tuple[str, ...]:
    parts = [p.strip() for p in (value or "").split(",") if p.strip()]
    if len(parts) > MAX_NODE_IPS:
        raise _Refused(400, f"{NODE_IP_HEADER} lists more than {MAX_NODE_IPS} addresses")
    try:
        return tuple(str(ipaddress.ip_address(p)) for p in parts)
    except ValueError:
        raise _Refused(400, f"{NODE_IP_HEADER} holds something that is not an IP address") from None


def _parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    try:
        if body.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(body)
        else:
            csr = x509.load_der_x509_csr(body)
    except ValueError:
        raise _Refused(400, "the body is not a certificate signing request (DER or PEM)") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported algorithm: not a CSR we can trust either way
        valid = False
    if not valid:
        raise _Refused(400, "the CSR's signature does not verify with its own public key")
    return csr


def _signable_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _RSA_MIN_BITS:
        return key
    raise _Refused(400, f"unsupported CSR key ({keys.describe(key)}); use EC P-256")


def _subject(
    spec: LeafSpec, node_name: str | None, ips: tuple[str, ...]
) -> tuple[str, tuple[str, ...]]:
    """CN and SANs for a leaf, from the route's profile and the node headers only."""
    if _names_node(spec) and not node_name:
        raise _Refused(400, f"the {NODE_NAME_HEADER} header is required for {spec.name}")
    ident = NodeIdentity(node_name=node_name or "", node_ips=ips)
    return spec.common_name(node_name or ""), wanted_sans(spec, ident)


def _names_node(spec: LeafSpec) -> bool:
    """The leaf is a node's own (its name in the CN or SANs): the kubelet's two certs."""
    return "{node}" in spec.cn or spec.sans is SanSet.KUBELET


def _clip(text: str, limit: int = 120) -> str:
    """Request text is attacker-controlled: keep it short and printable in logs."""
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable if len(printable) <= limit else printable[: limit - 3] + "..."


def _linger_close(conn: socket.socket) -> None:
    """Half-close, then drop what the client already sent (at most MAX_CSR_BYTES + 1 bytes, for
    at most LINGER_SECONDS): closing a socket with unread data sends a TCP reset, which can
    destroy our answer before the client reads it."""
    try:
        conn.shutdown(socket.SHUT_WR)  # an SSLSocket drops TLS here: what follows is raw bytes
        deadline, left = time.monotonic() + LINGER_SECONDS, MAX_CSR_BYTES + 1
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            conn.settimeout(remaining)
            chunk = conn.recv(min(left, 16384))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass


# The server --------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        node: Node,
        rollout: RolloutProvider,
        clock: Clock,
        cluster: ClusterAPI | None,
        passwords: NodePasswords | None,
        gate: ConnectionGate,
    ) -> None:
        self.node, self.rollout, self.clock, self.cluster = node, rollout, clock, cluster
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._lock = threading.Lock()
        self._material = _load_material(node, clock())
        self._failed_stamp: Stamp | None = None
        self._signed = 0
        self.passwords = passwords
        self.san_policy = _san_policy(node)
        self.gate = gate
        self._local = threading.local()  # the connection's ticket, for its handler
        self._flood: dict[str, tuple[float, int]] = {}  # event -> (last logged, not logged since)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can block on DNS; not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    # the accept loop: sleeps in select() until a client or stop() comes (no polling)

    def serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._stopping:
                        self._accept()

    def _accept(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # the client gave up before accept()
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def server_close(self) -> None:
        super().server_close()
        self.gate.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # snapshot of the CA material

    def current(self) -> _Material:
        with self._lock:
            material, now = self._material, self.clock()
            stamp = _stamp(self.node.layout)
            fresh = now < material.tls_not_after - TLS_REISSUE_BEFORE
            if (stamp == material.stamp or stamp == self._failed_stamp) and fresh:
                return material
            try:
                self._material = _load_material(self.node, now)
            except (Rke2certdError, OSError, ssl.SSLError) as exc:
                self._failed_stamp = stamp  # retry only when the files change again
                log.warning(
                    "supervisor_reload_failed", cert_path=str(self.node.layout.tls),
                    reason=f"{exc}; still serving the previous CA snapshot",
                )  # fmt: skip
                return material
            self._failed_stamp = None
            log.info(
                "supervisor_reloaded", cert_path=str(self.node.layout.tls),
                reason="CA files changed" if stamp != material.stamp else "serving cert renewed",
                cert_not_after=self._material.tls_not_after.isoformat(),
            )  # fmt: skip
            return self._material

    def reload(self) -> None:
        """Load the CA files now (raises when they are unusable)."""
        material = _load_material(self.node, self.clock())
        with self._lock:
            self._material, self._failed_stamp = material, None

    def count_signed(self) -> None:
        with self._lock:
            self._signed += 1

    @property
    def signed(self) -> int:
        with self._lock:
            return self._signed

    # connections: a thread each, TLS handshake in it, admitted and timed by the gate

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        if self.cluster is not None:  # the fleet's limit (supervisor/fleet_limits.py)
            self.gate.max_total = self.cluster.max_connections
        ticket = self.gate.admit(address, request)
        if isinstance(ticket, Refusal):
            self._flood_log("connection_refused", address, ticket.reason)
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._connection, args=(request, client_address, ticket), daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: drop this one, keep serving
            self.gate.release(ticket)
            self.shutdown_request(request)

    def _connection(self, request: socket.socket, client_address: Any, ticket: Ticket) -> None:
        conn: socket.socket | None = None
        try:
            request.settimeout(IO_TIMEOUT)
            # The TLS socket takes over the fd: the gate must hold it before the handshake,
            # which the deadline covers too.
            conn = self.current().context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            if not self.gate.rebind(ticket, conn):
                return
            try:
                conn.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("tls_handshake_failed", remote_addr=str(client_address[0]),
                          reason=str(exc))  # fmt: skip
                return
            self._local.ticket = ticket
            _Handler(conn, client_address, self)
        except OSError as exc:  # the client went away, or was cut (ticket.why, logged below)
            if not ticket.why:
                log.debug("connection_lost", remote_addr=str(client_address[0]),
                          reason=f"{type(exc).__name__}: {exc}")  # fmt: skip
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if ticket.why:
                self._flood_log("connection_cut", str(client_address[0]), ticket.why)
            self.gate.release(ticket)  # before the fd is closed (see ConnectionGate.release)
            self._local.ticket = None
            if conn is not None:
                conn.close()
            self.shutdown_request(request)

    def _flood_log(self, event: str, address: str, reason: str) -> None:
        """At most one warning per event a second: a flood of connections is one line a second
        (with how many more there were), not one per connection."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._flood.get(event, (-FLOOD_LOG_SECONDS, 0))
            if now - last < FLOOD_LOG_SECONDS:
                self._flood[event] = (last, skipped + 1)
                return
            self._flood[event] = (now, 0)
        log.warning(event, remote_addr=address, reason=reason, not_logged_before=skipped)

    def was_cut(self) -> bool:
        """This thread's connection was cut (its deadline passed, or it made room)."""
        ticket = getattr(self._local, "ticket", None)
        return ticket is not None and bool(ticket.why)

    def promote(self) -> None:
        """This thread's connection showed a valid credential (see limits.py)."""
        ticket = getattr(self._local, "ticket", None)
        if ticket is not None:
            self.gate.promote(ticket)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        log.error("supervisor_request_failed", remote_addr=str(client_address[0]),
                  reason=f"{type(exc).__name__}: {exc}")  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "rke2certd"
    timeout = IO_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    _linger = False  # set when an answer leaves the request body unread

    def version_string(self) -> str:
        return self.server_version

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _linger_close(self.connection)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends its body (curl asks for large bodies).
        try:
            self._admit()
        except _Refused as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        self.close_connection = True  # one request per connection: each gets its own deadline
        if self.server.was_cut():
            return  # what was read before the cut is no request: nothing to answer
        try:
            route, caller, length = self._admit()
            body = self._read_body(length) if length else b""
            if caller is not None:
                self.server.promote()  # a valid credential and a whole request: no deadline
            self._serve(route, caller, body)
        except _Refused as refusal:
            self._refuse(refusal)

    # checks, in order

    @property
    def _path(self) -> str:
        return urlsplit(self.path).path

    def _admit(self) -> tuple[_Route, Caller | None, int]:
        route = _ROUTES.get(self._path)
        if route is None:
            raise _Refused(404, "no such route")
        if self.command != route.method:
            raise _Refused(405, f"use {route.method}", {"Allow": route.method})
        caller = self._authenticate(route) if route.role else None
        length = self._body_length() if route.method != "GET" else 0
        return route, caller, length

    def _authenticate(self, route: _Route) -> Caller:
        user, password = _basic_credentials(self.headers.get("Authorization"))
        try:
            agent, server = agent_password(self.server.node), server_password(self.server.node)
        except (Rke2certdError, OSError, UnicodeDecodeError) as exc:
            raise _Refused(503, f"this server cannot read its tokens: {exc}") from None
        if agent is None and server is None:
            raise _Refused(503, "this server has no agent token yet (run rke2certd renew)")
        # Which pair grants what: the server token's password with user server is a server;
        # the agent token's password (with either user) or the server token's with user node
        # is an agent. Both compared, always, so that timing says nothing about which matched.
        is_server = _same(password, server) & (user == SERVER_USER)
        is_agent = _same(password, agent) | _same(password, server)
        if not (is_server or is_agent):
            raise _Refused(401, "wrong credentials", CHALLENGE)
        if user not in (AGENT_USER, SERVER_USER):
            raise _Refused(403, "only the users node and server may use this endpoint")
        role = SERVER_USER if is_server else AGENT_USER
        if route.role == SERVER_USER and role != SERVER_USER:
            raise _Refused(403, "this route is for servers only (the agent token cannot use it)")
        node_name = _node_name(self.headers.get(NODE_NAME_HEADER))
        return Caller(role, node_name, str(self.client_address[0]))

    def _body_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise _Refused(411, "send the body with a Content-Length (no chunked encoding)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Refused(411, "Content-Length required")
        if len(values) > 1 or not values[0].strip().isdigit():
            raise _Refused(400, "invalid Content-Length")
        length = int(values[0])
        if length > MAX_CSR_BYTES:
            raise _Refused(413, f"the body is larger than {MAX_CSR_BYTES} bytes")
        if length == 0:
            raise _Refused(400, "empty body")
        return length

    # answers

    def _serve(self, route: _Route, caller: Caller | None, body: bytes) -> None:
        if route.kind == "sign" and caller is not None:
            self._sign(CERT_ROUTES[self._path], caller, body)
        elif route.kind in ("server-ca", "client-ca"):
            bundle = self.server.current().cas[route.kind].bundle
            self._send(200, bundle, PEM_TYPE)
        elif route.kind == "rollout" and caller is not None:
            self._send(200, self._rollout(caller), "application/json")
        elif route.kind == "cluster" and caller is not None:
            self._send(200, self._cluster(caller, body), "application/json")
        else:
            raise _Refused(501, "rke2certd does not serve this route; RKE2's supervisor does")

    def _rollout(self, caller: Caller) -> bytes:
        try:
            doc = dict(self.server.rollout(caller))
            return (json.dumps(doc, default=str) + "\n").encode()
        except Exception as exc:  # the daemon's callback must not take the endpoint down
            raise _Refused(500, f"the rollout state is unavailable ({type(exc).__name__})") from exc

    def _prove_node(self, node_name: str) -> None:
        """The caller is `node_name`: its node password, recorded at first use, proves it."""
        passwords = self.server.passwords
        if passwords is None:
            raise _Refused(503, "this server has no datastore to check node passwords with")
        try:
            passwords.check(node_name, self.headers.get(NODE_PASSWORD_HEADER))
        except NodeRefused as exc:
            raise _Refused(exc.status, exc.reason) from None
        except Rke2certdError as exc:  # the datastore: the agent retries (or another server)
            raise _Refused(503, f"the datastore did not answer: {str(exc)[:300]}") from None

    def _cluster(self, caller: Caller, body: bytes) -> bytes:
        api = self.server.cluster
        if api is None:
            raise _Refused(503, "this server has no datastore to coordinate rollouts with")
        if caller.node_name is None:
            raise _Refused(400, f"the {NODE_NAME_HEADER} header is required")
        try:
            doc = wire.loads(body, MAX_JSON_DEPTH)
        except wire.WireError as exc:
            raise _Refused(400, str(exc)) from None
        self._prove_node(caller.node_name)
        try:
            answer = api.handle(caller.node_name, doc)
        except ClusterRefused as exc:
            raise _Refused(exc.status, exc.reason) from None
        except Rke2certdError as exc:  # the datastore: the agent retries (or another server)
            raise _Refused(503, f"the datastore did not answer: {str(exc)[:300]}") from None
        return json.dumps(answer).encode()

    def _read_body(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length)  # length <= MAX_CSR_BYTES, checked in _admit
        except TimeoutError:
            raise _Refused(408, "timed out reading the body") from None
        except OSError:
            raise _Refused(400, "the connection ended before the body") from None
        if len(body) != length:
            raise _Refused(400, "the body is shorter than its Content-Length")
        return body

    def _sign(self, spec: LeafSpec, caller: Caller, body: bytes) -> None:
        csr = _parse_csr(body)
        public_key = _signable_key(csr)
        ips = _node_ips(self.headers.get(NODE_IP_HEADER))
        cn, sans = _subject(spec, caller.node_name, ips)
        if caller.node_name is not None and _names_node(spec):
            names = [caller.node_name, *(s for s in sans if s != "localhost")]
            if problems := refused_sans(names, (), self.server.san_policy):
                raise _Refused(403, "this server never signs for an agent: " + "; ".join(problems))
            self._prove_node(caller.node_name)
        ca = self.server.current().cas[spec.signer]
        now = self.server.clock()
        cert = build.leaf(cn, spec.orgs, spec.usage, sans, public_key, ca.cert, ca.key, now)
        self.server.count_signed()
        log.info(
            "cert_signed", node_name=caller.node_name, http_path=self._path,
            cert_service=spec.service, cert_name=spec.name, cert_cn=cn,
            cert_serial=certs.serial_hex(cert), cert_not_after=certs.not_after(cert).isoformat(),
            client_user=caller.user, remote_addr=caller.remote_addr,
        )  # fmt: skip
        self._send(200, certs.bundle_pem([cert]) + ca.bundle, PEM_TYPE)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        notify("request_served", http_path=self._path, http_status=status)  # the metrics
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, refusal: _Refused) -> None:
        emit = log.warning if refusal.status in (400, 401, 403, 413) else log.info
        emit(
            "request_refused", http_status=refusal.status, http_method=_clip(self.command or ""),
            http_path=_clip(self._path), reason=refusal.reason,
            remote_addr=str(self.client_address[0]),
        )  # fmt: skip
        body = (refusal.reason + "\n").encode()
        self.close_connection = True  # the body may be unread: never parse it as a request
        self._linger = True
        self.send_response(refusal.status)
        for name, value in refusal.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own events say more, and never include headers

    def log_error(self, format: str, *args: Any) -> None:
        # The stdlib's own refusals (bad request line, unsupported method...).
        log.info("request_refused", reason=_clip(format % args),
                 remote_addr=str(self.client_address[0]))  # fmt: skip


# Public API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The endpoint's connection limits (the defaults are the constants of the package)."""

    max_connections: int = MAX_CONNECTIONS
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    per_address: int = MAX_PER_ADDRESS
    deadline: float = REQUEST_DEADLINE


@dataclass
class SupervisorHandle:
    """A running endpoint. `url` is for clients on this host (loopback when bound to all)."""

    host: str
    port: int
    _server: _Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"https://[{host}]:{self.port}" if ":" in host else f"https://{host}:{self.port}"

    @property
    def signed_count(self) -> int:
        """Certificates signed since start (tests and metrics)."""
        return self._server.signed

    def reload(self) -> None:
        """Re-read the CA files and re-issue the serving cert now (also done on file change)."""
        self._server.reload()

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(timeout=5)
        self._server.server_close()
        log.info("supervisor_stopped", port=self.port)

    def __enter__(self) -> SupervisorHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start(
    node: Node,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    rollout: RolloutProvider | None = None,
    clock: Clock = system_clock,
    cluster: ClusterAPI | None = None,
    passwords: Datastore | None = None,
    limits: Limits | None = None,
) -> SupervisorHandle:
    """Serve agents on host:port (port None: `supervisor-port`; 0: any free port).

    Node passwords are recorded in `passwords`, else in the cluster's datastore; with neither,
    the routes that act as a node answer 503. `limits`: the connection limits (tests).
    Needs the server's CA files (run renew first); raises Rke2certdError when they are unusable
    or the port cannot be bound.
    """
    wanted_port = node.cfg.supervisor_port if port is None else port
    store = passwords if passwords is not None else (cluster.ds if cluster else None)
    node_passwords = NodePasswords(store, node.cfg.node) if store is not None else None
    lim = limits or Limits()
    gate = ConnectionGate(
        max_total=lim.max_connections, max_pending=lim.max_unauthenticated,
        per_address=lim.per_address, deadline=lim.deadline,
    )  # fmt: skip
    try:
        server = _Server(
            (host, wanted_port), node, rollout or _no_rollout, clock, cluster, node_passwords, gate
        )
    except OSError as exc:
        gate.stop()
        raise Rke2certdError(
            f"cannot listen on {host}:{wanted_port} for agents: {exc.strerror or exc}; "
            "free the port or set supervisor-port"
        ) from exc
    thread = threading.Thread(target=server.serve, name="rke2certd-supervisor", daemon=True)
    thread.start()
    bound_port = int(server.server_address[1])
    log.info("supervisor_started", host=host, port=bound_port)
    return SupervisorHandle(host, bound_port, server, thread)
