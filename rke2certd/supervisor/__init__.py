"""The agent-facing HTTPS endpoint on servers (`server`) and its client on agents (`client`).

Shape-compatible with RKE2's supervisor (RKE2-PKI.md §3, §6): `GET /cacerts` unauthenticated,
CSR routes under `/v1-rke2/` with basic auth `node:<password>` and the node's name/IPs in the
`rke2-Node-Name` / `rke2-Node-IP` headers. It listens on `supervisor-port` (9346), beside RKE2's
own supervisor on 9345, so both can run on one server.
"""

from __future__ import annotations

from rke2certd.pki.profiles import AGENT_LEAVES, LeafSpec

ROUTE_PREFIX = "/v1-rke2"
CACERTS_PATH = "/cacerts"
SERVER_CA_PATH = f"{ROUTE_PREFIX}/server-ca.crt"
CLIENT_CA_PATH = f"{ROUTE_PREFIX}/client-ca.crt"
ROLLOUT_PATH = f"{ROUTE_PREFIX}/rollout"
CLUSTER_PATH = f"{ROUTE_PREFIX}/cluster"  # coordination keys for agents (cluster_api.py)
NODE_NAME_HEADER = "rke2-Node-Name"
NODE_IP_HEADER = "rke2-Node-IP"
AGENT_USER = "node"
SERVER_USER = "server"
MAX_CSR_BYTES = 64 * 1024  # a CSR is < 2 KiB; anything near this is not a CSR
MAX_CONNECTIONS = 128  # the endpoint's connections at once; beyond, new ones are closed at once


def cert_route(name: str) -> str:
    """The CSR route of an agent leaf: `client-kubelet` -> `/v1-rke2/client-kubelet.crt`."""
    return f"{ROUTE_PREFIX}/{name}.crt"


# route -> the agent leaf it signs (RKE2-PKI.md §3)
CERT_ROUTES: dict[str, LeafSpec] = {cert_route(spec.name): spec for spec in AGENT_LEAVES}
