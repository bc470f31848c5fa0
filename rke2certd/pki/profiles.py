"""RKE2's leaf certificates as data and the SANs each wants (docs/RKE2-COMPATIBILITY.md §3, §4)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from rke2certd.pki.layout import Layout


class SanSet(Enum):
    NONE = "none"
    APISERVER = "apiserver"
    ETCD_SERVER = "etcd-server"
    ETCD_PEER = "etcd-peer"
    LOOPBACK = "loopback"
    KUBELET = "kubelet"


@dataclass(frozen=True)
class LeafSpec:
    """One leaf: where it lives, what it says, who signs it, which service owns it."""

    name: str  # path under its base dir, without extension
    agent: bool  # under <data>/agent (True) or <data>/server/tls (False)
    cn: str  # may contain {node}
    orgs: tuple[str, ...]
    usage: str  # client | server | both
    signer: str  # a CA name from layout.CA_NAMES
    sans: SanSet
    service: str

    def cert_path(self, layout: Layout) -> Path:
        base = layout.agent if self.agent else layout.tls
        return base / f"{self.name}.crt"

    def key_path(self, layout: Layout) -> Path:
        base = layout.agent if self.agent else layout.tls
        return base / f"{self.name}.key"

    def common_name(self, node_name: str) -> str:
        return self.cn.format(node=node_name)


# fmt: off
def _s(name: str, cn: str, orgs: tuple[str, ...], usage: str, signer: str, service: str,
       sans: SanSet = SanSet.NONE) -> LeafSpec:
    return LeafSpec(name, False, cn, orgs, usage, signer, sans, service)


def _a(name: str, cn: str, orgs: tuple[str, ...], usage: str, signer: str, service: str,
       sans: SanSet = SanSet.NONE) -> LeafSpec:
    return LeafSpec(name, True, cn, orgs, usage, signer, sans, service)
# fmt: on


MASTERS = ("system:masters",)
CC, SC, RC = "client-ca", "server-ca", "request-header-ca"
ESC, EPC = "etcd/server-ca", "etcd/peer-ca"

# fmt: off
SERVER_LEAVES: tuple[LeafSpec, ...] = (
    _s("client-admin", "system:admin", MASTERS, "client", CC, "admin"),
    _s("client-supervisor", "system:rke2-supervisor", MASTERS, "client", CC, "supervisor"),
    _s("client-controller", "system:kube-controller-manager", (), "client", CC,
       "controller-manager"),
    _s("client-scheduler", "system:kube-scheduler", (), "client", CC, "scheduler"),
    _s("client-kube-apiserver", "system:apiserver", MASTERS, "client", CC, "api-server"),
    _s("client-kube-proxy", "system:kube-proxy", (), "client", CC, "kube-proxy"),
    _s("client-rke2-controller", "system:rke2-controller", (), "client", CC, "rke2-controller"),
    _s("client-rke2-cloud-controller", "rke2-cloud-controller-manager", (), "client", CC,
       "cloud-controller"),
    _s("serving-kube-apiserver", "kube-apiserver", (), "server", SC, "api-server",
       SanSet.APISERVER),
    _s("client-auth-proxy", "system:auth-proxy", (), "client", RC, "auth-proxy"),
    _s("etcd/client", "etcd-client", (), "client", ESC, "etcd"),
    _s("etcd/server-client", "etcd-server", (), "both", ESC, "etcd", SanSet.ETCD_SERVER),
    _s("etcd/peer-server-client", "etcd-peer", (), "both", EPC, "etcd", SanSet.ETCD_PEER),
    _s("kube-scheduler/kube-scheduler", "kube-scheduler", (), "server", SC, "scheduler",
       SanSet.LOOPBACK),
    _s("kube-controller-manager/kube-controller-manager", "kube-controller-manager", (),
       "server", SC, "controller-manager", SanSet.LOOPBACK),
)

AGENT_LEAVES: tuple[LeafSpec, ...] = (
    _a("client-kubelet", "system:node:{node}", ("system:nodes",), "client", CC, "kubelet"),
    _a("serving-kubelet", "{node}", (), "server", SC, "kubelet", SanSet.KUBELET),
    _a("client-kube-proxy", "system:kube-proxy", (), "client", CC, "kube-proxy"),
    _a("client-rke2-controller", "system:rke2-controller", (), "client", CC, "rke2-controller"),
)
# fmt: on

# Services an operator may name (docs/RKE2-COMPATIBILITY.md §5); `supervisor` too (internal).
SERVICES = (
    "admin",
    "api-server",
    "controller-manager",
    "scheduler",
    "rke2-controller",
    "rke2-server",
    "cloud-controller",
    "etcd",
    "auth-proxy",
    "kubelet",
    "kube-proxy",
    "supervisor",
)

# Which RKE2 unit must restart to load a service's new files.
SERVER_UNIT = "rke2-server"
AGENT_UNIT = "rke2-agent"

KUBECONFIGS = {
    "admin": "client-admin",
    "supervisor": "client-supervisor",
    "controller": "client-controller",
    "scheduler": "client-scheduler",
    "api-server": "client-kube-apiserver",
    "cloud-controller": "client-rke2-cloud-controller",
}

APISERVER_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
)


@dataclass(frozen=True)
class NodeIdentity:
    """What the SANs are computed from; resolved from config by the shell."""

    node_name: str
    node_ips: tuple[str, ...] = ()
    advertise_address: str | None = None
    tls_sans: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    service_cidrs: tuple[str, ...] = ("10.43.0.0/16",)


def _dedupe(values: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for v in values:
        if v:
            seen.setdefault(v, None)
    return tuple(seen)


def first_service_ips(cidrs: Sequence[str]) -> list[str]:
    out = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        out.append(str(net.network_address + 1))
    return out


def server_sans(node: NodeIdentity) -> tuple[str, ...]:
    """Configured SANs, loopbacks, node name, node IPs, advertise address, first service IP."""
    return _dedupe(
        [
            *node.tls_sans,
            "127.0.0.1",
            "::1",
            "localhost",
            node.node_name,
            *node.node_ips,
            node.advertise_address or "",
            *first_service_ips(node.service_cidrs),
        ]
    )


def wanted_sans(spec: LeafSpec, node: NodeIdentity) -> tuple[str, ...]:
    match spec.sans:
        case SanSet.NONE:
            return ()
        case SanSet.APISERVER:
            return _dedupe(
                [
                    *APISERVER_NAMES,
                    f"kubernetes.default.svc.{node.cluster_domain}",
                    *server_sans(node),
                ]
            )
        case SanSet.ETCD_SERVER | SanSet.ETCD_PEER:
            # RKE2 gives both etcd serving certs the same names (kine.sock too): a peer cert
            # without it is re-made, with a new key, at RKE2's next start.
            return _dedupe(["localhost", "kine.sock", *server_sans(node)])
        case SanSet.LOOPBACK:
            return ("localhost", "127.0.0.1", "::1")
        case SanSet.KUBELET:
            return _dedupe([node.node_name, "localhost", "127.0.0.1", *node.node_ips])


def leaves_for(server: bool, agent: bool) -> tuple[LeafSpec, ...]:
    return (SERVER_LEAVES if server else ()) + (AGENT_LEAVES if agent else ())


def by_service(specs: Sequence[LeafSpec], services: Sequence[str]) -> tuple[LeafSpec, ...]:
    wanted = set(services)
    return tuple(s for s in specs if s.service in wanted)
