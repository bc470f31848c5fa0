"""What the endpoint signs for a CSR route: checks on the CSR and the node headers, and the leaf.

Only the CSR's public key is used, after its signature verifies; its subject and every extension
it asks for are ignored. CN, O, EKU and SANs come from the route (docs/RKE2-COMPATIBILITY.md §4)
and the node headers, and `build.leaf` never makes a CA. The reply is the leaf then the CA
bundle.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rke2certd.ops.ca_material import CA
from rke2certd.ops.node import Node
from rke2certd.pki import build, keys
from rke2certd.pki.profiles import LeafSpec, NodeIdentity, SanSet, server_sans, wanted_sans
from rke2certd.supervisor import NODE_IP_HEADER, NODE_NAME_HEADER
from rke2certd.supervisor.node_auth import SanPolicy, refused_sans
from rke2certd.supervisor.request import Caller, Refused

MAX_NODE_IPS = 16
_RSA_MIN_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class LeafOrder:
    """A checked request for a leaf: what will be signed, and whether the node must prove
    its name first (the leaf is a node's own)."""

    spec: LeafSpec
    cn: str
    sans: tuple[str, ...]
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    proves_node: bool


def san_policy(node: Node) -> SanPolicy:
    """The names this server never signs for an agent: the cluster's and its own."""
    cfg = node.cfg
    return SanPolicy(cfg.cluster_domain, tuple(cfg.service_cidr), server_sans(node.ident))


def _node_ips(value: str | None) -> tuple[str, ...]:
    parts = [p.strip() for p in (value or "").split(",") if p.strip()]
    if len(parts) > MAX_NODE_IPS:
        raise Refused(400, f"{NODE_IP_HEADER} lists more than {MAX_NODE_IPS} addresses")
    try:
        return tuple(str(ipaddress.ip_address(p)) for p in parts)
    except ValueError:
        raise Refused(400, f"{NODE_IP_HEADER} holds something that is not an IP address") from None


def _parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    try:
        if body.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(body)
        else:
            csr = x509.load_der_x509_csr(body)
    except ValueError:
        raise Refused(400, "the body is not a certificate signing request (DER or PEM)") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported algorithm: not a CSR we can trust either way
        valid = False
    if not valid:
        raise Refused(400, "the CSR's signature does not verify with its own public key")
    return csr


def _signable_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _RSA_MIN_BITS:
        return key
    raise Refused(400, f"unsupported CSR key ({keys.describe(key)}); use EC P-256")


def _names_node(spec: LeafSpec) -> bool:
    """The leaf is a node's own (its name in the CN or SANs): the kubelet's two certs."""
    return "{node}" in spec.cn or spec.sans is SanSet.KUBELET


def _subject(
    spec: LeafSpec, node_name: str | None, ips: tuple[str, ...]
) -> tuple[str, tuple[str, ...]]:
    """CN and SANs for a leaf, from the route's profile and the node headers only."""
    if _names_node(spec) and not node_name:
        raise Refused(400, f"the {NODE_NAME_HEADER} header is required for {spec.name}")
    ident = NodeIdentity(node_name=node_name or "", node_ips=ips)
    return spec.common_name(node_name or ""), wanted_sans(spec, ident)


def check_order(
    spec: LeafSpec, caller: Caller, body: bytes, ip_header: str | None, policy: SanPolicy
) -> LeafOrder:
    """The leaf `caller` may have for `body` (a CSR) on the route of `spec`; raises Refused."""
    public_key = _signable_key(_parse_csr(body))
    cn, sans = _subject(spec, caller.node_name, _node_ips(ip_header))
    proves_node = caller.node_name is not None and _names_node(spec)
    if caller.node_name is not None and proves_node:
        names = [caller.node_name, *(s for s in sans if s != "localhost")]
        if problems := refused_sans(names, (), policy):
            raise Refused(403, "this server never signs for an agent: " + "; ".join(problems))
    return LeafOrder(spec, cn, sans, public_key, proves_node)


def issue(order: LeafOrder, ca: CA, now: datetime) -> x509.Certificate:
    spec = order.spec
    return build.leaf(
        order.cn, spec.orgs, spec.usage, order.sans, order.public_key, ca.cert, ca.key, now
    )
