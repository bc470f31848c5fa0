"""The RKE2 stand-in on its own (no rke2certd hook): that it behaves as upstream RKE2 does at
start, so that the tests beside it prove something about RKE2.

Run: python3 -m pytest -q -p no:cacheprovider tests/rke2/test_standin.py
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.certs import LEAVES, ec_pem, load_certs, load_key, new_ec_key, pem
from tests.harness.rke2.node import RKE2Server, ca_hash
from tests.harness.rke2.rotate import validate
from tests.rke2.conftest import Cluster

pytestmark = pytest.mark.etcd

CA_FILES = [bs.FIELDS[f] for f in bs.CA_FIELDS]


def _ca_bytes(node: RKE2Server) -> dict[str, bytes]:
    return {rel: (node.server_dir / rel).read_bytes() for rel in CA_FILES}


def test_codec_round_trip_and_key_name() -> None:
    files = {"ServerCA": (1_700_000_000_123_456_789, b"pem"), "IPSECKey": (0, b"x")}
    assert bs.decode_files(bs.encode_files(files)) == files
    assert bs.format_timestamp(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    value = bs.encrypt("K10abc::server:pw", b"data")
    salt, _ = value.decode().split(":", 1)
    assert len(salt) == 16
    assert bs.decrypt("pw", value) == b"data"
    with pytest.raises(bs.BootstrapFatal, match="encrypted with different token"):
        bs.decrypt("other", value)
    assert bs.bootstrap_key("K10abc::server:pw") == bs.bootstrap_key("pw")
    assert bs.bootstrap_key("pw").startswith("/bootstrap/") and len(bs.bootstrap_key("pw")) == 23


def test_first_server_creates_joining_server_gets_the_same_cas(cluster: Cluster) -> None:
    s1 = cluster.server("s1", hook=False, token="first-secret")
    s1.start()
    assert set(s1.stored_bootstrap()) == set(bs.FIELDS)
    token = (s1.server_dir / "token").read_text().strip()
    assert token == f"K10{ca_hash((s1.tls / 'server-ca.crt').read_bytes())}::server:first-secret"
    assert os.readlink(s1.server_dir / "agent-token") == str(s1.server_dir / "token")
    stored = s1.stored_bootstrap()
    for field, rel in bs.FIELDS.items():  # the key holds the files as on disk, mtime and all
        path = s1.server_dir / rel
        assert stored[field] == (path.stat().st_mtime_ns, path.read_bytes()), field

    s2 = cluster.server("s2", hook=False, join=s1)
    s2.start()
    assert _ca_bytes(s2) == _ca_bytes(s1)
    for field, rel in bs.FIELDS.items():  # written with mtime = the served Timestamp
        assert (s2.server_dir / rel).stat().st_mtime_ns == stored[field][0], field
    assert {m["name"] for m in s1.etcd_members()} == {"s1", "s2"}
    # s2's leaves are its own, signed by the shared CAs
    for leaf in LEAVES:
        cert = load_certs(s2.tls / f"{leaf.name}.crt")[0]
        ca = load_certs(s1.tls / f"{leaf.ca}.crt")[0]
        cert.verify_directly_issued_by(ca)


def test_a_newer_ca_file_on_disk_stops_the_start_with_upstreams_message(
    cluster: Cluster,
) -> None:
    s1 = cluster.server("s1", hook=False, token="secret")
    s1.start()
    s1.stop()
    path = s1.tls / "client-ca.crt"
    stored_ns = bs.read_from_disk(s1.server_dir)["ClientCA"][0]
    original = path.read_bytes()

    # other content, 2 s newer: the datastore wins and the file is written back
    path.write_bytes(original + b"\n")
    os.utime(path, ns=(stored_ns + 2_000_000_000,) * 2)
    s1.start()
    assert path.read_bytes() == original
    assert path.stat().st_mtime_ns == stored_ns
    assert str(path) in s1.last_written
    s1.stop()

    # other content, 3 s newer: fatal, nothing written
    path.write_bytes(original + b"\n")
    os.utime(path, ns=(stored_ns + 3_000_000_000,) * 2)
    with pytest.raises(bs.BootstrapFatal) as err:
        s1.start()
    assert str(err.value) == (
        f"{path} newer than datastore and could cause a cluster outage. Remove the file(s) "
        "from disk and restart to be recreated from datastore."
    )
    assert path.read_bytes() == original + b"\n"
    assert not s1.running

    # same content, any mtime: nothing to do
    path.write_bytes(original)
    s1.start()
    assert s1.last_written == []


def test_a_second_start_with_nothing_to_do_writes_nothing(cluster: Cluster) -> None:
    s1 = cluster.server("s1", hook=False, token="secret")
    s1.start()
    s1.stop()
    before = {p: p.stat().st_mtime_ns for p in s1.tls.rglob("*") if p.is_file()}
    s1.start()
    assert s1.last_certs == {} and s1.last_written == []
    after = {p: p.stat().st_mtime_ns for p in s1.tls.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before if "standin" not in str(p)} == {
        p: t for p, t in before.items() if "standin" not in str(p)
    }


def _reissue(
    node: RKE2Server, name: str, days: int, cn: str | None = None, sans: bool = True
) -> None:
    """Replace a leaf with one from its CA valid `days` more days (other CN, no SANs)."""
    leaf = next(x for x in LEAVES if x.name == name)
    old = load_certs(node.tls / f"{name}.crt")[0]
    ca = load_certs(node.tls / f"{leaf.ca}.crt")[0]
    key = new_ec_key()
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else old.subject
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            False,
        )
    )
    if sans and leaf.sans != "none":
        b = b.add_extension(
            old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
        )
    cert = b.sign(load_key(node.tls / f"{leaf.ca}.key"), hashes.SHA256())  # type: ignore[arg-type]
    (node.tls / f"{name}.crt").write_bytes(pem(cert) + pem(ca))
    (node.tls / f"{name}.key").write_bytes(ec_pem(key))


def test_leaves_are_renewed_at_start_as_upstream_renews_them(cluster: Cluster) -> None:
    s1 = cluster.server("s1", hook=False, token="secret")
    s1.start()
    s1.stop()
    _reissue(s1, "client-admin", days=119)  # inside the 120-day window
    _reissue(s1, "client-controller", days=121)  # outside it: kept
    _reissue(s1, "client-scheduler", days=300, cn="someone-else")
    _reissue(s1, "serving-kube-apiserver", days=300, sans=False)
    kept_key = (s1.tls / "client-kube-proxy.key").read_bytes()
    (s1.tls / "client-kube-proxy.crt").unlink()
    s1.start()
    assert s1.last_certs == {
        "client-admin": "expiring",
        "client-scheduler": "cn",
        "serving-kube-apiserver": "sans",
        "client-kube-proxy": "missing",
    }
    assert (s1.tls / "client-kube-proxy.key").read_bytes() == kept_key  # a missing cert keeps
    s1.stop()

    # a leaf from another CA (same names) is re-made: the issuer changed
    other = cluster.server("other", hook=False, token="another")
    other.start()
    other.stop()
    for ext in ("crt", "key"):
        (s1.tls / f"client-admin.{ext}").write_bytes(
            (other.tls / f"client-admin.{ext}").read_bytes()
        )
    s1.start()
    assert s1.last_certs == {"client-admin": "issuer"}


def test_rotate_ca_checks_and_writes_the_bootstrap_key(cluster: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s1 = cluster.server("s1", hook=False, token="secret")
    s1.start()
    # a self-signed replacement (one cert) is refused with every reason, nothing changes
    new_dir = tmp_path / "rotate" / "tls"
    new_dir.mkdir(parents=True)
    key = new_ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "new-server-ca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (new_dir / "server-ca.crt").write_bytes(pem(cert))
    (new_dir / "server-ca.key").write_bytes(ec_pem(key))
    before = s1.stored_bootstrap()
    with pytest.raises(ValueError, match="more than one certificate") as err:
        s1.rotate_ca(tmp_path / "rotate")
    assert "does not chain" in str(err.value)
    assert s1.stored_bootstrap() == before
    # --force saves it anyway, into the key only; the disk changes at the next start
    disk = (s1.tls / "server-ca.crt").read_bytes()
    s1.rotate_ca(tmp_path / "rotate", force=True)
    assert s1.stored_bootstrap()["ServerCA"][1] == pem(cert)
    assert s1.stored_bootstrap()["ClientCA"] == before["ClientCA"]
    assert (s1.tls / "server-ca.crt").read_bytes() == disk
    assert validate(bs.read_from_disk(s1.server_dir), {}) == []


def test_the_standins_etcd_client_waits_out_a_leader_election(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member that answers 503 (no leader yet: a member of a two-server cluster just
    restarted) is asked again, as etcd's own client retries `Unavailable`; any other error
    answer fails at once, and a 503 that lasts fails after UNAVAILABLE_SECONDS. A real HTTP
    server plays the member: no etcd can be made to hold an election on cue."""
    import http.server
    import json
    import threading

    from tests.harness.rke2 import etcd as standin_etcd

    answers: list[int] = []

    class Member(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            code = answers.pop(0) if answers else 200
            body = json.dumps({"kvs": []} if code == 200 else {"error": "no leader"}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Member)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = standin_etcd.EtcdClient([f"http://127.0.0.1:{server.server_port}"], None)
        answers[:] = [503, 503]
        assert client.get("/bootstrap/x") is None and answers == []  # the third answered
        answers[:] = [400, 503]
        with pytest.raises(ConnectionError, match="400"):
            client.get("/bootstrap/x")
        assert answers == [503]  # not asked again
        monkeypatch.setattr(standin_etcd, "UNAVAILABLE_SECONDS", 0.0)
        answers[:] = [503] * 3
        with pytest.raises(ConnectionError, match="503"):
            client.get("/bootstrap/x")
    finally:
        server.shutdown()
        server.server_close()
