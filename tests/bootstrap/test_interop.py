"""Bit-compatibility with RKE2's bootstrap data (docs/RKE2-COMPATIBILITY.md §6) through
`rke2certd renew`, against implementations independent of rke2certd: the CA set is made with
the openssl CLI (serial 0, as upstream), the plaintext is encoded here in Go's JSON form, and
the value is encrypted and decrypted with Node's crypto."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

from .support import (
    CA_FIELDS,
    CA_FILES,
    Backend,
    bootstrap_key,
    ca_set,
    go_json,
    go_time,
    node_decrypt,
    node_encrypt,
    openssl_verify_leaves,
)

PASSWORD = "rke2-made-this-cluster-token"
CN_PREFIX = {
    "server-ca": "rke2-server-ca",
    "client-ca": "rke2-client-ca",
    "request-header-ca": "rke2-request-header-ca",
    "etcd/server-ca": "etcd-server-ca",
    "etcd/peer-ca": "etcd-peer-ca",
}
PASSWD = b"secret1,node,node,rke2:agent\nsecret2,server,server,rke2:server\n"
IPSEC = b"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n"
STAMP = 1_714_558_830_123_456_789  # 2024-05-01T10:20:30.123456789Z


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def rke2_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA set as RKE2 makes it, by the openssl CLI: P-256 SEC1 keys, self-signed CAs with
    serial 0, an RSA 2048 PKCS#1 service key. {file under server/: bytes}."""
    d = tmp_path_factory.mktemp("rke2-cas")
    out: dict[str, bytes] = {}
    for name, cn in CN_PREFIX.items():
        key = d / (name.replace("/", "-") + ".key")
        key.write_bytes(openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout"))
        out[f"tls/{name}.key"] = key.read_bytes()
        out[f"tls/{name}.crt"] = openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            str(key),
            "-subj",
            f"/CN={cn}@1714558830",
            "-days",
            "3650",
            "-set_serial",
            "0",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        )
    out["tls/service.key"] = openssl("genrsa", "-traditional", "2048")
    assert out["tls/service.key"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert out["tls/server-ca.key"].startswith(b"-----BEGIN EC PRIVATE KEY-----")
    return out


def test_value_made_as_rke2_makes_it_is_taken_by_renew_byte_exact(
    backend: Backend, rke2_files: dict[str, bytes]
) -> None:
    fields: dict[str, tuple[str, bytes | None]] = {
        field: (go_time(STAMP + i), rke2_files[rel])
        for i, (field, rel) in enumerate(sorted(CA_FIELDS.items()))
    }
    fields["PasswdFile"] = (go_time(STAMP), PASSWD)
    fields["IPSECKey"] = (go_time(STAMP), IPSEC)
    fields["EncryptionConfig"] = ("0001-01-01T00:00:00Z", None)  # unset: a nil []byte
    fields["EncryptionHash"] = ("0001-01-01T00:00:00Z", None)
    key, value = node_encrypt(PASSWORD, go_json(fields))
    assert key == bootstrap_key(PASSWORD)

    cfg, data = backend.node("joiner", token=PASSWORD)
    backend.put(key, value, data)
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr

    assert ca_set(data) == {rel: rke2_files[rel] for rel in CA_FILES}
    server = data / "server"
    assert (server / "cred" / "passwd").read_bytes() == PASSWD
    assert (server / "cred" / "ipsec.psk").read_bytes() == IPSEC
    for path in (server / "cred" / "passwd", server / "cred" / "ipsec.psk"):
        assert path.stat().st_mode & 0o7777 == 0o600
    assert not (server / "cred" / "encryption-config.json").exists()
    openssl_verify_leaves(data)  # leaves signed by the serial-0 CAs
    assert backend.bootstrap_values(data) == {key: value}  # RKE2's value is left as it was


def test_value_saved_by_rke2certd_decrypts_with_node_crypto_to_go_json(backend: Backend) -> None:
    cfg, data = backend.node("first", token=PASSWORD)
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    [(key, value)] = backend.bootstrap_values(data).items()
    assert key == bootstrap_key(PASSWORD)

    m = re.fullmatch(rb"([0-9a-f]{16}):([A-Za-z0-9+/]+={0,2})", value)
    assert m, value[:40]
    plaintext = node_decrypt(PASSWORD, value)
    assert len(base64.b64decode(m.group(2))) == 12 + len(plaintext) + 16  # nonce, data, tag

    # What RKE2 writes for these files: each Timestamp is the file's mtime, to the nanosecond.
    expected: dict[str, tuple[str, bytes | None]] = {}
    for field, rel in CA_FIELDS.items():
        path: Path = data / "server" / rel
        expected[field] = (go_time(path.stat().st_mtime_ns), path.read_bytes())
    assert plaintext == go_json(expected)
