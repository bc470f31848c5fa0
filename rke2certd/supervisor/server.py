"""The HTTPS endpoint servers run for agents: `/cacerts`, the CSR routes, the cluster route.

Its parts: `tls_snapshot.py` (the serving cert and the CA snapshot, reloaded on file change),
`admission.py` (credentials, node names, body length), `signing.py` (what a CSR route signs),
`routes.py` (the table of routes and their handlers), `http.py` (the accept loop, connections
and the request plumbing) and `limits.py` (the connection gate). This module starts and stops
it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rke2certd.clock import Clock, system_clock
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.supervisor import (
    MAX_CONNECTIONS,
    MAX_PER_ADDRESS,
    MAX_UNAUTHENTICATED,
    REQUEST_DEADLINE,
)
from rke2certd.supervisor.cluster_api import ClusterAPI
from rke2certd.supervisor.http import EndpointServer
from rke2certd.supervisor.limits import ConnectionGate
from rke2certd.supervisor.node_auth import NodePasswords
from rke2certd.supervisor.request import Caller
from rke2certd.supervisor.routes import PATHS, Services
from rke2certd.supervisor.signing import san_policy
from rke2certd.supervisor.tls_snapshot import TlsSnapshot

__all__ = ["ROUTES", "Caller", "Limits", "SupervisorHandle", "start"]

ROUTES = PATHS  # the metrics' route label: these, or `other`


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
    _server: EndpointServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _cluster: ClusterAPI | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"https://[{host}]:{self.port}" if ":" in host else f"https://{host}:{self.port}"

    @property
    def signed_count(self) -> int:
        """Certificates signed since start (tests and metrics)."""
        return self._server.services.signed

    def reload(self) -> None:
        """Re-read the CA files and re-issue the serving cert now (also done on file change)."""
        self._server.services.tls.reload()

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.unfollow_resize(self._server.gate.resize)
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
    clock: Clock = system_clock,
    cluster: ClusterAPI | None = None,
    passwords: Datastore | None = None,
    limits: Limits | None = None,
    proof_clock: Callable[[], float] = time.monotonic,
) -> SupervisorHandle:
    """Serve agents on host:port (port None: `supervisor-port`; 0: any free port).

    Node passwords are recorded in `passwords`, else in the cluster's datastore; with neither,
    the routes that act as a node answer 503; `proof_clock` times how long a node's proof
    stands (node_auth.PROOF_TTL; tests). `limits`: the connection limits (tests); with a
    cluster, the total follows the cluster's limit for the fleet (`ClusterAPI.resize`).
    Needs the server's CA files (run renew first); raises Rke2certdError when they are unusable
    or the port cannot be bound.
    """
    wanted_port = node.cfg.supervisor_port if port is None else port
    store = passwords if passwords is not None else (cluster.ds if cluster else None)
    node_passwords = NodePasswords(store, node.cfg.node, proof_clock) if store is not None else None
    lim = limits or Limits()
    services = Services(
        node, clock, TlsSnapshot(node, clock), cluster, node_passwords, san_policy(node)
    )
    gate = ConnectionGate(
        max_total=lim.max_connections,
        max_pending=lim.max_unauthenticated,
        per_address=lim.per_address,
        deadline=lim.deadline,
    )
    try:
        server = EndpointServer((host, wanted_port), services, gate)
    except OSError as exc:
        gate.stop()
        raise Rke2certdError(
            f"cannot listen on {host}:{wanted_port} for agents: {exc.strerror or exc}; "
            "free the port or set supervisor-port"
        ) from exc
    if cluster is not None:  # the fleet's limit (fleet_limits.py), now and as the fleet changes
        cluster.follow_resize(gate.resize)
    thread = threading.Thread(target=server.serve, name="rke2certd-supervisor", daemon=True)
    thread.start()
    bound_port = int(server.server_address[1])
    log.info("supervisor_started", host=host, port=bound_port)
    return SupervisorHandle(host, bound_port, server, thread, cluster)
