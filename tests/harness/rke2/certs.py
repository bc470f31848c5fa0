"""The certificates an RKE2 server makes at its start, as upstream's deps.go makes them.

- CAs (`<prefix>-ca@<unix>`, self-signed, 10 years, CA key usages) only where the cert or key
  file is missing; `service.key` (RSA 2048, PKCS#1) only where missing; the `.nochain.crt`
  files and `service.current.key` derived every start.
- Each leaf is (re)made when the CA was just made, when it is missing, when it expires within
  120 days (upstream's CertificateRenewDays), when its CN or O set changed, when a wanted DNS or
  IP SAN is missing, or when its AKI is not the SKI of the first cert of its CA file. A re-made
  leaf gets a new key; a missing cert with its key present keeps the key. File = the leaf then
  every cert of the CA file.
- Leaves and SANs per deps.go: the configured SANs of an RKE2 server (`tls-san`, then the
  loopbacks, `localhost`, the node name, node IPs, the advertise address) are added to the
  apiserver cert (with the kubernetes names and the first service IP) and to both etcd serving
  certs (with `kine.sock`); the etcd server cert is not made with `disable-etcd`.
- kube-scheduler and kube-controller-manager serving certs under `tls/kube-*/` are not made by
  deps.go; the stand-in leaves them as it finds them.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RENEW_DAYS = 120
LEAF_DAYS = 365
CA_DAYS = 3650
CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
SERVER = (ExtendedKeyUsageOID.SERVER_AUTH,)
BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)

# CA file stem (under server/tls) -> CN prefix
CAS = {
    "client-ca": "rke2-client",
    "server-ca": "rke2-server",
    "request-header-ca": "rke2-request-header",
    "etcd/server-ca": "etcd-server",
    "etcd/peer-ca": "etcd-peer",
}


@dataclass(frozen=True)
class Leaf:
    name: str  # stem under server/tls
    cn: str
    orgs: tuple[str, ...]
    usages: tuple[x509.ObjectIdentifier, ...]
    ca: str
    sans: str  # none | apiserver | etcd


MASTERS = ("system:masters",)
LEAVES: tuple[Leaf, ...] = (
    Leaf("client-admin", "system:admin", MASTERS, CLIENT, "client-ca", "none"),
    Leaf("client-supervisor", "system:rke2-supervisor", MASTERS, CLIENT, "client-ca", "none"),
    Leaf("client-controller", "system:kube-controller-manager", (), CLIENT, "client-ca", "none"),
    Leaf("client-scheduler", "system:kube-scheduler", (), CLIENT, "client-ca", "none"),
    Leaf("client-kube-apiserver", "system:apiserver", MASTERS, CLIENT, "client-ca", "none"),
    Leaf("client-kube-proxy", "system:kube-proxy", (), CLIENT, "client-ca", "none"),
    Leaf("client-rke2-controller", "system:rke2-controller", (), CLIENT, "client-ca", "none"),
    Leaf(
        "client-rke2-cloud-controller",
        "rke2-cloud-controller-manager",
        (),
        CLIENT,
        "client-ca",
        "none",
    ),
    Leaf("serving-kube-apiserver", "kube-apiserver", (), SERVER, "server-ca", "apiserver"),
    Leaf("client-auth-proxy", "system:auth-proxy", (), CLIENT, "request-header-ca", "none"),
    Leaf("etcd/client", "etcd-client", (), CLIENT, "etcd/server-ca", "none"),
    Leaf("etcd/peer-server-client", "etcd-peer", (), BOTH, "etcd/peer-ca", "etcd"),
    Leaf("etcd/server-client", "etcd-server", (), BOTH, "etcd/server-ca", "etcd"),
)


@dataclass(frozen=True)
class Identity:
    node_name: str
    node_ips: tuple[str, ...] = ()
    advertise_address: str | None = None
    tls_sans: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    service_cidr: str = "10.43.0.0/16"

    def server_sans(self) -> list[str]:
        """RKE2's server SANs (config.SANs): tls-san, loopbacks, localhost, name, IPs, the
        advertise address and the first service IP (the server command adds each)."""
        out = [*self.tls_sans, "127.0.0.1", "::1", "localhost", self.node_name, *self.node_ips]
        if self.advertise_address:
            out.append(self.advertise_address)
        out.append(self.first_service_ip())
        return out

    def first_service_ip(self) -> str:
        return str(ipaddress.ip_network(self.service_cidr, strict=False).network_address + 1)


def wanted_sans(leaf: Leaf, ident: Identity) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) deps.go gives a leaf."""
    names: list[str] = []
    if leaf.sans == "apiserver":
        domain = ident.cluster_domain
        names = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{domain}",
            *ident.server_sans(),
        ]
    elif leaf.sans == "etcd":
        names = ["kine.sock", *ident.server_sans()]
    dns: list[str] = []
    ips: list[str] = []
    for n in names:
        try:
            ips.append(str(ipaddress.ip_address(n)))
        except ValueError:
            dns.append(n)
    return dns, ips


# -- keys and PEM -----------------------------------------------------------------------------


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ec_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def load_key(path: Path) -> object:
    return serialization.load_pem_private_key(path.read_bytes(), None)


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".standin-tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- CAs --------------------------------------------------------------------------------------


def make_ca(cn: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, True, False, False, False), True
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def ensure_cas(tls: Path) -> dict[str, bool]:
    """Make each CA whose cert or key is missing (and service.key); return CA -> made now."""
    made: dict[str, bool] = {}
    for stem, prefix in CAS.items():
        crt, key_path = tls / f"{stem}.crt", tls / f"{stem}.key"
        if crt.exists() and key_path.exists():
            made[stem] = False
            continue
        if key_path.exists():
            key = load_key(key_path)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
        else:
            key = new_ec_key()
            write_file(key_path, ec_pem(key), 0o600)
        write_file(crt, pem(make_ca(f"{prefix}-ca@{int(time.time())}", key)), 0o644)
        made[stem] = True
    service = tls / "service.key"
    if not service.exists():
        rsa_key = rsa.generate_private_key(65537, 2048)
        write_file(
            service,
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
            0o600,
        )
    return made


def derive_files(tls: Path) -> list[Path]:
    """The `.nochain.crt` files and service.current.key, written only when their content
    changes (so a start with nothing to do leaves them alone)."""
    changed = []
    for stem in ("client-ca", "server-ca"):
        first = pem(load_certs(tls / f"{stem}.crt")[0])
        if _write_if_changed(tls / f"{stem}.nochain.crt", first, 0o644):
            changed.append(tls / f"{stem}.nochain.crt")
    keys = (tls / "service.key").read_bytes()
    first_key = serialization.load_pem_private_key(keys, None)
    assert isinstance(first_key, rsa.RSAPrivateKey)
    data = first_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    if _write_if_changed(tls / "service.current.key", data, 0o600):
        changed.append(tls / "service.current.key")
    return changed


def _write_if_changed(path: Path, data: bytes, mode: int) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    write_file(path, data, mode)
    return True


# -- leaves -----------------------------------------------------------------------------------


def renewal_reason(
    leaf: Leaf, ident: Identity, tls: Path, now: datetime, renew_days: int = RENEW_DAYS
) -> str | None:
    """Why deps.go would re-make this leaf at a start now (None: it keeps it)."""
    crt, key = tls / f"{leaf.name}.crt", tls / f"{leaf.name}.key"
    if not crt.exists():
        return "missing"
    try:
        cert = load_certs(crt)[0]
    except ValueError:
        return None  # upstream treats an unreadable file as not expired and unchanged
    if cert.not_valid_after_utc - now < timedelta(days=renew_days):
        return "expiring"
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != leaf.cn:
        return "cn"
    orgs = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}
    if orgs != set(leaf.orgs):
        return "o"
    dns, ips = wanted_sans(leaf, ident)
    have_dns: set[str] = set()
    have_ips: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have_dns = set(san.get_values_for_type(x509.DNSName))
        have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        pass
    if not set(dns) <= have_dns or not set(ips) <= have_ips:
        return "sans"
    ca = load_certs(tls / f"{leaf.ca}.crt")[0]
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        aki_id = aki.key_identifier
    except x509.ExtensionNotFound:
        aki_id = None
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    if aki_id != ski:
        return "issuer"
    if not key.exists():
        return "missing"
    return None


def issue_leaf(leaf: Leaf, ident: Identity, tls: Path, new_key: bool) -> None:
    ca_certs = load_certs(tls / f"{leaf.ca}.crt")
    ca_key = load_key(tls / f"{leaf.ca}.key")
    key_path = tls / f"{leaf.name}.key"
    if not new_key and key_path.exists():
        key = load_key(key_path)
    else:
        key = new_ec_key()
        write_file(key_path, ec_pem(key), 0o600)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca = ca_certs[0]
    now = datetime.now(UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in leaf.orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, leaf.cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - timedelta(hours=1), ca.not_valid_before_utc))
        .not_valid_after(now + timedelta(days=LEAF_DAYS))
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage(list(leaf.usages)), False)
    )
    # Go copies the parent's SubjectKeyId into the leaf's AKI.
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    builder = builder.add_extension(aki, False)
    dns, ips = wanted_sans(leaf, ident)
    if dns or ips:
        general: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        general += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_file(tls / f"{leaf.name}.crt", pem(cert) + b"".join(pem(c) for c in ca_certs), 0o644)


def server_leaves(disable_etcd: bool) -> Sequence[Leaf]:
    return tuple(x for x in LEAVES if not (disable_etcd and x.name == "etcd/server-client"))


def gen_server_certs(
    tls: Path, ident: Identity, disable_etcd: bool, now: datetime | None = None
) -> dict[str, str]:
    """deps.go's genCerts at a start: CAs where missing, leaves where a reason says so.
    Returns leaf name -> why it was made."""
    made_cas = ensure_cas(tls)
    derive_files(tls)
    now = now or datetime.now(UTC)
    done: dict[str, str] = {}
    for leaf in server_leaves(disable_etcd):
        reason = "ca-created" if made_cas[leaf.ca] else renewal_reason(leaf, ident, tls, now)
        if reason is None:
            continue
        regen = reason != "missing"
        issue_leaf(leaf, ident, tls, new_key=regen)
        done[leaf.name] = reason
    return done
