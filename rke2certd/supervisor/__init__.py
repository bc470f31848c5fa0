"""The agent-facing HTTPS endpoint on servers (`server`) and its client on agents (`client`).

Shape-compatible with RKE2's supervisor (docs/RKE2-COMPATIBILITY.md §4, §7): `GET /cacerts`
unauthenticated, CSR routes under `/v1-rke2/` with basic auth `node:<password>` and the node's
name/IPs in the `rke2-Node-Name` / `rke2-Node-IP` headers. It listens on `supervisor-port` (9346),
beside RKE2's own supervisor on 9345, so both can run on one server.
"""

from __future__ import annotations

from rke2certd.pki.profiles import AGENT_LEAVES, LeafSpec

ROUTE_PREFIX = "/v1-rke2"
CACERTS_PATH = "/cacerts"
SERVER_CA_PATH = f"{ROUTE_PREFIX}/server-ca.crt"
CLIENT_CA_PATH = f"{ROUTE_PREFIX}/client-ca.crt"
CLUSTER_PATH = f"{ROUTE_PREFIX}/cluster"  # coordination keys for agents (cluster_api.py)
NODE_NAME_HEADER = "rke2-Node-Name"
NODE_IP_HEADER = "rke2-Node-IP"
# The agent's per-node password (RKE2's `/etc/rancher/node/password`): the server records a hash
# of it for the node name at first use and refuses another one later (supervisor/node_auth.py).
NODE_PASSWORD_HEADER = "rke2-Node-Password"  # noqa: S105 (a header name)
AGENT_USER = "node"
SERVER_USER = "server"
MAX_CSR_BYTES = 64 * 1024  # a CSR is < 2 KiB; anything near this is not a CSR
MAX_CONNECTIONS = 128  # the endpoint's connections at once; beyond, new ones are closed at once
# Connections that have not shown a valid credential yet (handshake, headers, `/cacerts`): at
# most this many at once, so that the rest always stay free for authenticated agents.
MAX_UNAUTHENTICATED = MAX_CONNECTIONS // 2
MAX_PER_ADDRESS = 16  # unauthenticated connections from one source address at once
# TLS handshake + request line + headers + body, in total (not per socket operation): a client
# that trickles bytes is cut off at this deadline, however slowly it sends.
REQUEST_DEADLINE = 10.0
LISTEN_BACKLOG = 256  # the kernel's queue of accepted-but-not-yet-taken connections
MAX_JSON_DEPTH = 32  # the cluster route's documents nest 3 deep; deeper is refused unparsed


def cert_route(name: str) -> str:
    """The CSR route of an agent leaf: `client-kubelet` -> `/v1-rke2/client-kubelet.crt`."""
    return f"{ROUTE_PREFIX}/{name}.crt"


# route -> the agent leaf it signs (docs/RKE2-COMPATIBILITY.md §4)
CERT_ROUTES: dict[str, LeafSpec] = {cert_route(spec.name): spec for spec in AGENT_LEAVES}
