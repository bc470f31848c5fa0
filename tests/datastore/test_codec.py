"""The bootstrap codec against vectors computed by independent implementations (Node's crypto,
the openssl CLI), and its handling of every damaged input."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from rke2certd.datastore.codec import (
    BOOTSTRAP_FIELDS,
    GO_ZERO_TIME,
    ROTATABLE_FIELDS,
    WRONG_TOKEN,
    BootstrapFile,
    bootstrap_key_name,
    decode_bootstrap,
    decrypt,
    derive_key,
    encode_bootstrap,
    encrypt,
    format_go_time,
    parse_go_time,
    passphrase_from_token,
)
from rke2certd.errors import DatastoreError, TokenError

PASSPHRASE = "my-cluster-secret"
SALT = bytes.fromhex("0011223344556677")
NONCE = bytes.fromhex("000102030405060708090a0b")
CERT_B64 = (
    "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJkdW1teQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg=="
)
KEY_B64 = (
    "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpNSUlF"
    "ZHVtbXkKLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K"
)
# Go's json.NewEncoder output: sorted names, nanosecond and local-offset timestamps, newline.
PLAINTEXT = (
    '{"ServerCA":{"Timestamp":"2024-05-01T10:20:30.123456789Z","Content":"' + CERT_B64 + '"},'
    '"ServiceKey":{"Timestamp":"2024-05-01T12:20:30.1+02:00","Content":"' + KEY_B64 + '"}}\n'
).encode()

# Produced by Node's crypto, an implementation independent of ours, with exactly:
#   node -e '
#   const c = require("crypto");
#   const b64 = (s) => Buffer.from(s).toString("base64");
#   const ca = b64("-----BEGIN CERTIFICATE-----\nMIIBdummy\n-----END CERTIFICATE-----\n");
#   const key = b64("-----BEGIN RSA PRIVATE KEY-----\nMIIEdummy\n-----END RSA PRIVATE KEY-----\n");
#   const pt = Buffer.from(
#     `{"ServerCA":{"Timestamp":"2024-05-01T10:20:30.123456789Z","Content":"${ca}"},` +
#     `"ServiceKey":{"Timestamp":"2024-05-01T12:20:30.1+02:00","Content":"${key}"}}\n`);
#   const pw = "my-cluster-secret";
#   const salt = "0011223344556677";  // the 16 hex chars are themselves the PBKDF2 salt
#   const nonce = Buffer.from("000102030405060708090a0b", "hex");
#   const k = c.pbkdf2Sync(pw, Buffer.from(salt, "ascii"), 4096, 32, "sha1");
#   const gcm = c.createCipheriv("aes-256-gcm", k, nonce);
#   const ct = Buffer.concat([gcm.update(pt), gcm.final(), gcm.getAuthTag()]);
#   console.log("/bootstrap/" + c.createHash("sha256").update(pw).digest("hex").slice(0, 12));
#   console.log(salt + ":" + Buffer.concat([nonce, ct]).toString("base64"));'
NODE_KEY_NAME = "/bootstrap/c76451f66268"
NODE_VALUE = (
    b"0011223344556677:AAECAwQFBgcICQoLrJOoSZvNwqYO2gqwc2IlnkH97pcWOaBsmFBBaYHTYgy8lN7+N/VMfTPk"
    b"Nx7merzGoSOa30g1yaGhRoBgjCDmXcTubqAcxdD7d54N6OcFQFg9Q/Rl3IwpyYqkCXi6gnqdBYwBiTdUO3uiil8M"
    b"tCq5wnw1x8JZMvkprvV9zkN1mMYuCgVzpJsPMp/WqV9h+u3Fq1G5KDTYGc1+l5RIylhgIXzEp52eIaJKXyREDSFK"
    b"pBB26R0oNu5wsija7GWXFM1OZXIMqDZEuvARXiZa4VCWeFK0185EZPPKffowfN/rQE3hnUaSblRRKifzUbZD3jA6"
    b"HETiu2M6tTPdiO1K93KtiaCw+OeE81A/3JOw+9b9OQxuC+VxvRo57Tc6qmERjZ+q6mXLrEYdpDeCOQaeMggQFNGJ"
    b"QDZXOY+LUa/le33tr1RARk7kpVyppgyHbz+wQu5Vn+5UK58Ktw=="
)
# openssl kdf -keylen 32 -kdfopt digest:SHA1 -kdfopt pass:my-cluster-secret \
#     -kdfopt salt:0011223344556677 -kdfopt iter:4096 PBKDF2
OPENSSL_KEY = "4BD628F5352C40CDD4888B5B06C73964A24DAEFA6822D500352B3E3D6B995708"


def test_key_name_matches_node() -> None:
    assert bootstrap_key_name(PASSPHRASE) == NODE_KEY_NAME


def test_pbkdf2_matches_openssl() -> None:
    assert derive_key(PASSPHRASE, b"0011223344556677").hex().upper() == OPENSSL_KEY


def test_encrypt_matches_node_vector() -> None:
    assert encrypt(PASSPHRASE, PLAINTEXT, salt=SALT, nonce=NONCE) == NODE_VALUE


def test_decrypt_node_vector() -> None:
    assert decrypt(PASSPHRASE, NODE_VALUE) == PLAINTEXT


def test_random_salt_and_nonce_have_upstream_shape() -> None:
    a, b = encrypt(PASSPHRASE, b"x"), encrypt(PASSPHRASE, b"x")
    assert a != b
    assert re.fullmatch(rb"[0-9a-f]{16}:[A-Za-z0-9+/]+={0,2}", a)
    assert len(base64.b64decode(a.split(b":")[1])) == 12 + 1 + 16
    assert decrypt(PASSPHRASE, a) == decrypt(PASSPHRASE, b) == b"x"


def test_derived_key_is_cached() -> None:
    derive_key.cache_clear()
    decrypt(PASSPHRASE, NODE_VALUE)
    decrypt(PASSPHRASE, NODE_VALUE)
    assert derive_key.cache_info().hits >= 1


def test_wrong_token_is_a_clear_token_error() -> None:
    with pytest.raises(TokenError) as err:
        decrypt("another-secret", NODE_VALUE)
    assert WRONG_TOKEN in str(err.value)
    assert "another-secret" not in str(err.value)


@pytest.mark.parametrize(
    "value, words",
    [
        (b"garbage-without-colon", "not in the '<salt>:<base64>' form"),
        (b"0011223344556677:not base64!!", "bad base64"),
        (b"0011223344556677:" + NODE_VALUE.split(b":")[1][:-3], "bad base64"),  # cut mid-quartet
        (b"", "creation lock"),
    ],
)
def test_damaged_values_are_datastore_errors(value: bytes, words: str) -> None:
    with pytest.raises(DatastoreError) as err:
        decrypt(PASSPHRASE, value)
    assert not isinstance(err.value, TokenError)
    assert words in str(err.value)


def test_truncated_ciphertext() -> None:
    short = b"0011223344556677:" + base64.b64encode(base64.b64decode(NODE_VALUE[17:])[:27])
    with pytest.raises(DatastoreError, match="truncated: 27 bytes"):
        decrypt(PASSPHRASE, short)


def test_ciphertext_cut_at_a_quartet_fails_authentication() -> None:
    # Valid base64 but a shorter ciphertext: GCM cannot tell this from a wrong key; the
    # message names both causes.
    cut = NODE_VALUE[:-8]
    with pytest.raises(TokenError, match="damaged"):
        decrypt(PASSPHRASE, cut)


def test_plaintext_round_trip_is_byte_identical() -> None:
    files = decode_bootstrap(PLAINTEXT)
    assert encode_bootstrap(files) == PLAINTEXT
    ca = files["ServerCA"]
    assert ca.content.startswith(b"-----BEGIN CERTIFICATE-----")
    assert ca.nanos == 789 and ca.timestamp.microsecond == 123456
    assert ca.unix_ns == 1714558830123456789
    key = files["ServiceKey"]
    assert key.timestamp.utcoffset() == timedelta(hours=2)
    assert key.timestamp == datetime(2024, 5, 1, 10, 20, 30, 100000, tzinfo=UTC)


def test_older_untimestamped_form() -> None:
    old = ('{"ServerCA":"' + CERT_B64 + '","ServiceKey":"' + KEY_B64 + '"}').encode()
    files = decode_bootstrap(old)
    assert files["ServerCA"] == BootstrapFile(GO_ZERO_TIME, base64.b64decode(CERT_B64))
    assert files["ServiceKey"].content == base64.b64decode(KEY_B64)
    # re-saved in the new form with Go's zero time, as upstream's migration does
    assert b'"Timestamp":"0001-01-01T00:00:00Z"' in encode_bootstrap(files)


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'{"ServerCA": 5}', b'{"A": "@@@"}'])
def test_undecodable_plaintext(data: bytes) -> None:
    with pytest.raises(DatastoreError, match="not the JSON RKE2 writes"):
        decode_bootstrap(data)


def test_full_save_load_cycle() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    files = {name: BootstrapFile(now, f"{name} bytes".encode(), 234) for name in BOOTSTRAP_FIELDS}
    value = encrypt(PASSPHRASE, encode_bootstrap(files))
    assert decode_bootstrap(decrypt(PASSPHRASE, value)) == files


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T10:20:30Z",
        "2024-05-01T10:20:30.1Z",
        "2024-05-01T10:20:30.12Z",
        "2024-05-01T10:20:30.000000001Z",
        "2024-05-01T10:20:30.123456789Z",
        "2024-05-01T10:20:30.5+05:30",
        "2024-05-01T10:20:30-07:00",
        "0001-01-01T00:00:00Z",
    ],
)
def test_go_time_round_trip(text: str) -> None:
    assert format_go_time(*parse_go_time(text)) == text


def test_go_time_formatting_trims_fraction() -> None:
    t = datetime(2024, 5, 1, 10, 20, 30, 120000, tzinfo=timezone(timedelta(hours=-3)))
    assert format_go_time(t) == "2024-05-01T10:20:30.12-03:00"
    assert format_go_time(t.replace(microsecond=0)) == "2024-05-01T10:20:30-03:00"
    assert format_go_time(t.replace(microsecond=0), 5) == "2024-05-01T10:20:30.000000005-03:00"


def test_from_unix_ns() -> None:
    f = BootstrapFile.from_unix_ns(1_714_558_830_000_000_001, b"")
    assert f.unix_ns == 1_714_558_830_000_000_001
    assert format_go_time(f.timestamp, f.nanos) == "2024-05-01T10:20:30.000000001Z"


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        BootstrapFile(datetime(2024, 1, 1), b"")


HASH = "ab" * 32


@pytest.mark.parametrize(
    "token, passphrase",
    [
        (f"K10{HASH}::server:s3cret", "s3cret"),
        ("K10::server:s3cret", "s3cret"),
        (f"K10{HASH}::server:with:colons", "with:colons"),
        ("s3cret", "s3cret"),
        ("bare:with:colons", "bare:with:colons"),
        ("s3cret\n", "s3cret"),
    ],
)
def test_passphrase_from_token(token: str, passphrase: str) -> None:
    assert passphrase_from_token(token) == passphrase


@pytest.mark.parametrize(
    "token, words",
    [
        (f"K10{HASH}::node:agentpw", "agent token"),
        (f"K10{HASH}::admin:adminpw", "needs the server token"),
        ("K10abc::server:shortpw", "CA hash"),
        (f"K10{HASH}::server:", "no password"),
        (f"K10{HASH}", "K10<ca-hash>::server:<password>"),
        ("", "empty"),
        ("abcdef.0123456789abcdef", "bootstrap-style token"),
    ],
)
def test_bad_tokens(token: str, words: str) -> None:
    with pytest.raises(TokenError, match=re.escape(words)) as err:
        passphrase_from_token(token)
    for secret in ("agentpw", "adminpw", "shortpw", "0123456789abcdef"):
        assert secret not in str(err.value)


def test_field_table_matches_rke2_pki_section_5() -> None:
    assert BOOTSTRAP_FIELDS["ServerCA"] == "tls/server-ca.crt"
    assert BOOTSTRAP_FIELDS["ETCDPeerCAKey"] == "tls/etcd/peer-ca.key"
    assert BOOTSTRAP_FIELDS["ServiceKey"] == "tls/service.key"
    assert BOOTSTRAP_FIELDS["PasswdFile"] == "cred/passwd"
    assert BOOTSTRAP_FIELDS["IPSECKey"] == "cred/ipsec.psk"
    assert BOOTSTRAP_FIELDS["EncryptionConfig"] == "cred/encryption-config.json"
    assert BOOTSTRAP_FIELDS["EncryptionHash"] == "cred/encryption-state.json"
    assert len(BOOTSTRAP_FIELDS) == 15
    cas = {
        f"{p}{k}"
        for p in ("Server", "Client", "RequestHeader", "ETCDServer", "ETCDPeer")
        for k in ("CA", "CAKey")
    }
    assert {*cas, "ServiceKey"} == ROTATABLE_FIELDS
