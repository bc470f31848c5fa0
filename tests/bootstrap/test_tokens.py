"""Join tokens (docs/RKE2-COMPATIBILITY.md §7): generated on the very first server, written
with the CA hash, rewritten when the CAs change in the datastore, printed by `rke2certd token`.

The CA hash is computed here with the openssl CLI and sha256sum, not with rke2certd's code.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import run_cli

from .support import Backend, bootstrap_key, renew_in_process, tree

SERVER_TOKEN = re.compile(r"K10([0-9a-f]{64})::server:([0-9a-f]{32})\n")
AGENT_TOKEN = re.compile(r"K10([0-9a-f]{64})::node:([0-9a-f]{32})\n")


def sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def openssl_der_sha256(pem: bytes) -> str:
    der = subprocess.run(
        ["openssl", "x509", "-outform", "DER"], input=pem, capture_output=True, check=True
    ).stdout
    out = subprocess.run(["sha256sum"], input=der, capture_output=True, check=True)
    return out.stdout.split()[0].decode()


def openssl_names(pem: bytes) -> tuple[str, str]:
    out = (
        subprocess.run(
            ["openssl", "x509", "-noout", "-subject", "-issuer", "-nameopt", "RFC2253"],
            input=pem,
            capture_output=True,
            check=True,
            text=False,
        )
        .stdout.decode()
        .splitlines()
    )
    return out[0].removeprefix("subject="), out[1].removeprefix("issuer=")


def pem_blocks(bundle: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----\n"
    return [block + end for block in bundle.split(end) if block.strip()]


def token_files(data: Path) -> tuple[str, str]:
    return (data / "server" / "token").read_text(), (data / "server" / "agent-token").read_text()


def test_first_server_without_a_token_generates_one_and_writes_both_token_files(
    backend: Backend,
) -> None:
    cfg, data = backend.node("first")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr

    server, agent = token_files(data)
    s, a = SERVER_TOKEN.fullmatch(server), AGENT_TOKEN.fullmatch(agent)
    assert s and a, (server, agent)
    ca_hash, password = s.groups()
    assert a.groups() == (ca_hash, password)
    for name in ("token", "agent-token"):
        assert (data / "server" / name).stat().st_mode & 0o7777 == 0o600
    assert password not in res.stderr + res.stdout  # never logged

    # RKE2-COMPATIBILITY.md §7, one certificate: SHA-256 of the file's raw bytes (not the DER).
    server_ca = data / "server" / "tls" / "server-ca.crt"
    assert len(pem_blocks(server_ca.read_bytes())) == 1
    assert ca_hash == sha256sum(server_ca)
    assert ca_hash != openssl_der_sha256(server_ca.read_bytes())

    # The bootstrap data is stored under the generated password's key.
    assert list(backend.bootstrap_values(data)) == [bootstrap_key(password)]

    # Strong: 128 random bits, another first server gets another one.
    backend.wipe()
    cfg2, data2 = backend.node("another-first")
    renew_in_process(cfg2)
    assert SERVER_TOKEN.fullmatch(token_files(data2)[0])
    assert token_files(data2)[0].rsplit(":", 1)[1] != password + "\n"


def test_token_show_and_token_hash_print_the_token_files_and_the_ca_hash(
    backend: Backend,
) -> None:
    cfg, data = backend.node("first")
    renew_in_process(cfg)
    server, agent = token_files(data)

    shown = run_cli("-c", cfg, "token", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"server token: {server}agent token: {agent}"
    default = run_cli("-c", cfg, "token")
    assert default.stdout == shown.stdout

    hashed = run_cli("-c", cfg, "token", "hash")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout == sha256sum(data / "server" / "tls" / "server-ca.crt") + "\n"


def expected_bundle_hash(bundle: bytes) -> str:
    """RKE2-COMPATIBILITY.md §7, several certificates, by hand: the root that issued the first."""
    blocks = pem_blocks(bundle)
    _, first_issuer = openssl_names(blocks[0])
    roots = [b for b in blocks[1:] if openssl_names(b) == (first_issuer, first_issuer)]
    assert len(roots) == 1, "the staged bundle has one self-signed issuer of its first cert"
    return openssl_der_sha256(roots[0])


def test_ca_rotation_through_the_datastore_makes_the_next_renew_rewrite_both_tokens(
    backend: Backend,
) -> None:
    cfg, data = backend.node("first")
    renew_in_process(cfg)
    old_server, _ = token_files(data)
    password = SERVER_TOKEN.fullmatch(old_server).group(2)  # type: ignore[union-attr]
    stage = data.parent / "staged"

    res = run_cli("-c", cfg, "ca", "stage-rotation", "--out", stage)
    assert res.returncode == 0, res.stderr
    res = run_cli("-c", cfg, "certificate", "rotate-ca", "--path", stage)
    assert res.returncode == 0, res.stderr
    # Saved to the datastore only: the node's files and tokens are unchanged until its renew.
    assert token_files(data)[0] == old_server

    result = renew_in_process(cfg)
    assert {p.name for p in result.token_files} == {"token", "agent-token"}
    server_ca = data / "server" / "tls" / "server-ca.crt"
    assert server_ca.read_bytes() == (stage / "tls" / "server-ca.crt").read_bytes()
    new_hash = expected_bundle_hash(server_ca.read_bytes())
    assert token_files(data) == (
        f"K10{new_hash}::server:{password}\n",
        f"K10{new_hash}::node:{password}\n",
    )
    hashed = run_cli("-c", cfg, "token", "hash")
    assert hashed.stdout == new_hash + "\n"


def test_second_server_without_a_token_on_a_datastore_with_ca_data_asks_for_the_token(
    backend: Backend,
) -> None:
    backend.shared = True
    first_cfg, _ = backend.node("first")
    assert run_cli("-c", first_cfg, "renew").returncode == 0
    store_before = backend.dump()

    cfg, data = backend.node("second")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "already holds a cluster's CA data, but no token is configured" in res.stderr
    assert "set `token` (or `token-file`) to that cluster's server token" in res.stderr
    assert tree(data) == {}, "the second server wrote files"
    assert backend.dump() == store_before
