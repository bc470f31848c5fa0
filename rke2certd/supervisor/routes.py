"""The endpoint's routes: a table of path -> (method, who may call, handler), and the handlers.

A handler gets the admitted request (its caller authenticated, its body read) and returns the
answer, or raises Refused. What the handlers share (the node, the TLS snapshot, the cluster
route's API, the node passwords) is one `Services` per endpoint.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message

from rke2certd.clock import Clock
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.ops.node import Node
from rke2certd.pki import certs
from rke2certd.supervisor import (
    AGENT_USER,
    CACERTS_PATH,
    CERT_ROUTES,
    CLIENT_CA_PATH,
    CLUSTER_PATH,
    MAX_JSON_DEPTH,
    NODE_IP_HEADER,
    NODE_NAME_HEADER,
    ROUTE_PREFIX,
    SERVER_CA_PATH,
    SERVER_USER,
    wire,
)
from rke2certd.supervisor.admission import prove_node
from rke2certd.supervisor.cluster_api import ClusterAPI, ClusterRefused
from rke2certd.supervisor.node_auth import NodePasswords, SanPolicy
from rke2certd.supervisor.request import Caller, Refused
from rke2certd.supervisor.signing import check_order, issue
from rke2certd.supervisor.tls_snapshot import TlsSnapshot

PEM_TYPE = "application/x-pem-file"
JSON_TYPE = "application/json"


@dataclass
class Services:
    """What the handlers of one endpoint use."""

    node: Node
    clock: Clock
    tls: TlsSnapshot
    cluster: ClusterAPI | None
    passwords: NodePasswords | None
    san_policy: SanPolicy
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _signed: int = 0

    def count_signed(self) -> None:
        with self._lock:
            self._signed += 1

    @property
    def signed(self) -> int:
        with self._lock:
            return self._signed


@dataclass(frozen=True)
class Request:
    """An admitted request: `caller` is None on the open routes only."""

    path: str
    caller: Caller | None
    headers: Message
    body: bytes
    services: Services

    @property
    def authenticated(self) -> Caller:
        if self.caller is None:  # the table gives every route with a handler that needs one a role
            raise Refused(401, "credentials required")
        return self.caller


@dataclass(frozen=True)
class Answer:
    body: bytes
    content_type: str


Handler = Callable[[Request], Answer]


@dataclass(frozen=True)
class Route:
    method: str
    role: str | None  # None: open; AGENT_USER: node or server token; SERVER_USER: servers only
    handler: Handler


def _ca_bundle(name: str) -> Handler:
    def serve(request: Request) -> Answer:
        return Answer(request.services.tls.current().cas[name].bundle, PEM_TYPE)

    return serve


def _sign(request: Request) -> Answer:
    caller, services = request.authenticated, request.services
    spec = CERT_ROUTES[request.path]
    order = check_order(
        spec, caller, request.body, request.headers.get(NODE_IP_HEADER), services.san_policy
    )
    if order.proves_node and caller.node_name is not None:
        prove_node(services.passwords, caller.node_name, request.headers)
    ca = services.tls.current().cas[spec.signer]
    cert = issue(order, ca, services.clock())
    services.count_signed()
    log.info(
        "cert_signed",
        node_name=caller.node_name,
        http_path=request.path,
        cert_service=spec.service,
        cert_name=spec.name,
        cert_cn=order.cn,
        cert_serial=certs.serial_hex(cert),
        cert_not_after=certs.not_after(cert).isoformat(),
        client_user=caller.user,
        remote_addr=caller.remote_addr,
    )
    return Answer(certs.bundle_pem([cert]) + ca.bundle, PEM_TYPE)


def _cluster(request: Request) -> Answer:
    caller, services = request.authenticated, request.services
    api = services.cluster
    if api is None:
        raise Refused(503, "this server has no datastore to coordinate rollouts with")
    if caller.node_name is None:
        raise Refused(400, f"the {NODE_NAME_HEADER} header is required")
    try:
        doc = wire.loads(request.body, MAX_JSON_DEPTH)
    except wire.WireError as exc:
        raise Refused(400, str(exc)) from None
    prove_node(services.passwords, caller.node_name, request.headers)
    try:
        answer = api.handle(caller.node_name, doc)
    except ClusterRefused as exc:
        raise Refused(exc.status, exc.reason, code=exc.code) from None
    except Rke2certdError as exc:  # the datastore: the agent retries (or another server)
        raise Refused(503, f"the datastore did not answer: {str(exc)[:300]}") from None
    return Answer(json.dumps(answer).encode(), JSON_TYPE)


def _not_served(_request: Request) -> Answer:
    raise Refused(501, "rke2certd does not serve this route; RKE2's supervisor does")


ROUTES: dict[str, Route] = {
    CACERTS_PATH: Route("GET", None, _ca_bundle("server-ca")),
    SERVER_CA_PATH: Route("GET", AGENT_USER, _ca_bundle("server-ca")),
    CLIENT_CA_PATH: Route("GET", AGENT_USER, _ca_bundle("client-ca")),
    CLUSTER_PATH: Route("POST", AGENT_USER, _cluster),
    **{path: Route("POST", AGENT_USER, _sign) for path in CERT_ROUTES},
    # RKE2's server-only routes: known so that an agent token gets 403; never served here.
    f"{ROUTE_PREFIX}/server-bootstrap": Route("GET", SERVER_USER, _not_served),
    f"{ROUTE_PREFIX}/token": Route("PUT", SERVER_USER, _not_served),
    f"{ROUTE_PREFIX}/cert/cacerts": Route("POST", SERVER_USER, _not_served),
    f"{ROUTE_PREFIX}/encrypt/status": Route("GET", SERVER_USER, _not_served),
    f"{ROUTE_PREFIX}/encrypt/config": Route("PUT", SERVER_USER, _not_served),
}
PATHS = frozenset(ROUTES)  # the metrics' route label: these, or `other`
