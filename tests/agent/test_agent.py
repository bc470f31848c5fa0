"""Agent-only nodes: renew, rotate and check through a real server's endpoint."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from rke2certd.commands.agent import agent_renew, agent_rotate
from rke2certd.commands.bootstrap_write import write_tokens
from rke2certd.commands.check import check, render_json
from rke2certd.commands.renew import renew
from rke2certd.errors import TokenError, UsageError
from rke2certd.files.lock import node_lock
from rke2certd.node.node import Node
from rke2certd.pki import build, certs, keys
from rke2certd.pki.layout import CA_NAMES
from rke2certd.supervisor.server import SupervisorHandle
from tests.helpers_tls import ClientSide, ServerSide, handshake

from .helpers import ServerNode, first_cert, openssl, public_key_der, renew_agent, snapshot

LEAVES = ("client-kubelet", "serving-kubelet", "client-kube-proxy", "client-rke2-controller")
Events = list[dict[str, Any]]


def _a(node: Node, name: str) -> Path:
    return node.layout.agent / name


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(ext.get_values_for_type(x509.DNSName)) | {
        str(i) for i in ext.get_values_for_type(x509.IPAddress)
    }


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# (CN, subject in RFC 4514, EKU, SANs, signer) per docs/RKE2-COMPATIBILITY.md §4, agent-1/10.0.0.21
PROFILE: dict[str, tuple[str, list[x509.ObjectIdentifier], set[str], str]] = {
    "client-kubelet": (
        "CN=system:node:agent-1,O=system:nodes",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        set(),
        "client-ca",
    ),
    "serving-kubelet": (
        "CN=agent-1",
        [ExtendedKeyUsageOID.SERVER_AUTH],
        {"agent-1", "localhost", "127.0.0.1", "10.0.0.21"},
        "server-ca",
    ),
    "client-kube-proxy": (
        "CN=system:kube-proxy",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        set(),
        "client-ca",
    ),
    "client-rke2-controller": (
        "CN=system:rke2-controller",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        set(),
        "client-ca",
    ),
}


def test_first_renew_writes_agent_dir_as_rke2(
    agent: Node, server: ServerNode, endpoint: SupervisorHandle, events: Events
):
    result = renew_agent(agent)
    assert sorted(c.path.name for c in result.changes) == sorted(f"{n}.crt" for n in LEAVES)
    assert all(c.action == "issue" and c.new_key for c in result.changes)
    assert result.restart_units == ["rke2-agent"]
    assert endpoint.signed_count == 4
    assert len([e for e in events if e["event"] == "cert_signed"]) == 4

    assert _a(agent, "server-ca.crt").read_bytes() == server.file("server-ca.crt").read_bytes()
    assert _a(agent, "client-ca.crt").read_bytes() == server.file("client-ca.crt").read_bytes()
    for name, (subject, eku, sans, signer) in PROFILE.items():
        crt, key = _a(agent, f"{name}.crt"), _a(agent, f"{name}.key")
        assert crt.stat().st_mode & 0o777 == 0o644
        assert key.stat().st_mode & 0o777 == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")  # SEC1, P-256
        leaf = first_cert(crt)
        public = leaf.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        assert keys.public_der(public) == public_key_der(key)
        assert leaf.subject.rfc4514_string() == subject
        assert _eku(leaf) == eku
        assert _sans(leaf) == sans
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.value.ca is False
        # the file is the leaf followed by the server's CA file (full chain)
        ca_file = server.file(f"{signer}.crt")
        assert crt.read_bytes().endswith(ca_file.read_bytes())
        purpose = "sslserver" if name == "serving-kubelet" else "sslclient"
        res = openssl("verify", "-CAfile", ca_file, "-purpose", purpose, crt)
        assert res.returncode == 0, res.stdout + res.stderr
    res = openssl(
        "verify",
        "-CAfile",
        server.file("server-ca.crt"),
        "-verify_hostname",
        "agent-1",
        "-verify_ip",
        "10.0.0.21",
        _a(agent, "serving-kubelet.crt"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert server.password not in repr(events)
    assert "PRIVATE KEY" not in repr(events)


def test_second_run_changes_no_byte(agent: Node, endpoint: SupervisorHandle):
    renew_agent(agent)
    before = snapshot(agent.layout.data_dir)
    result = renew_agent(agent)
    assert result.changes == [] and result.derived == []
    assert snapshot(agent.layout.data_dir) == before
    assert endpoint.signed_count == 4


def test_keys_kept_when_certs_are_reissued(agent: Node, endpoint: SupervisorHandle):
    renew_agent(agent)
    keys_before = {n: public_key_der(_a(agent, f"{n}.key")) for n in LEAVES}
    for name in LEAVES:
        _a(agent, f"{name}.crt").unlink()
    result = renew_agent(agent)
    assert len(result.changes) == 4 and not any(c.new_key for c in result.changes)
    for name in LEAVES:
        assert public_key_der(_a(agent, f"{name}.key")) == keys_before[name]
        assert (
            keys.public_der(first_cert(_a(agent, f"{name}.crt")).public_key()) == keys_before[name]
        )
    # an unreadable key is replaced, the others stay
    _a(agent, "client-kube-proxy.key").write_bytes(b"garbage")
    result = renew_agent(agent)
    assert [(c.path.name, c.new_key) for c in result.changes] == [("client-kube-proxy.crt", True)]
    assert public_key_der(_a(agent, "client-kube-proxy.key")) != keys_before["client-kube-proxy"]


def test_dry_run_asks_nothing_signed_writes_nothing(agent: Node, endpoint: SupervisorHandle):
    result = agent_renew(agent, datetime.now(UTC), dry_run=True)
    assert len(result.changes) == 4 and result.dry_run
    assert sorted(p.name for p in result.derived) == ["client-ca.crt", "server-ca.crt"]
    assert not agent.layout.data_dir.exists() or snapshot(agent.layout.data_dir) == {}
    assert endpoint.signed_count == 0


def test_rotate_makes_new_keys_after_a_backup(agent: Node, endpoint: SupervisorHandle):
    renew_agent(agent)
    old = {p.name: p.read_bytes() for p in agent.layout.agent.iterdir() if p.is_file()}
    now = datetime.now(UTC)
    with node_lock(agent.layout.data_dir, 30):
        result = agent_rotate(agent, [], now)
    assert result.backup_dir == agent.layout.agent / f"tls-{int(now.timestamp())}"
    assert {p.name: p.read_bytes() for p in result.backup_dir.iterdir()} == old
    for p in result.backup_dir.iterdir():
        assert p.stat().st_mode & 0o777 == (0o600 if p.suffix == ".key" else 0o644)
    assert result.backup_dir.stat().st_mode & 0o777 == 0o700
    assert len(result.renew.changes) == 4
    for name in LEAVES:
        key = _a(agent, f"{name}.key")
        assert key.read_bytes() != old[key.name]
        res = openssl(
            "verify",
            "-CAfile",
            _a(agent, "server-ca.crt") if name == "serving-kubelet" else _a(agent, "client-ca.crt"),
            _a(agent, f"{name}.crt"),
        )
        assert res.returncode == 0, res.stdout
    # one service only; an unknown-here service changes nothing
    proxy_key = _a(agent, "client-kube-proxy.key").read_bytes()
    kubelet_key = _a(agent, "client-kubelet.key").read_bytes()
    with node_lock(agent.layout.data_dir, 30):
        result = agent_rotate(agent, ["kube-proxy"], datetime.now(UTC))
        assert [c.path.name for c in result.renew.changes] == ["client-kube-proxy.crt"]
        before = snapshot(agent.layout.data_dir)
        with pytest.raises(UsageError, match="service etcd has no certificate"):
            agent_rotate(agent, ["etcd"], datetime.now(UTC))
        assert snapshot(agent.layout.data_dir) == before
    assert _a(agent, "client-kube-proxy.key").read_bytes() != proxy_key
    assert _a(agent, "client-kubelet.key").read_bytes() == kubelet_key


def test_check_works_on_agent_only_layout(agent: Node):
    renew_agent(agent)
    result = check(agent, [], datetime.now(UTC))
    assert result.errors == []
    leaves = [r for r in result.rows if r.index == 0]
    assert sorted(r.path.name for r in leaves) == sorted(f"{n}.crt" for n in LEAVES)
    assert all(r.status.value == "OK" for r in result.rows)
    assert len(result.rows) == 8  # each file: the leaf and its one-cert CA bundle
    assert {r.service for r in leaves} == {"kubelet", "kube-proxy", "rke2-controller"}
    assert '"Filename": "client-kubelet.crt"' in render_json(result)
    only = check(agent, ["kube-proxy"], datetime.now(UTC))
    assert [r.path.name for r in only.rows if r.index == 0] == ["client-kube-proxy.crt"]


def test_tls_handshakes_with_the_server(agent: Node, server: ServerNode, tmp_path: Path):
    renew_agent(agent)
    # kubelet -> API server: the agent's client cert, verified with the server's client-ca
    api = ServerSide(
        server.file("serving-kube-apiserver.crt"),
        server.file("serving-kube-apiserver.key"),
        server.file("client-ca.crt"),
    )
    kubelet = ClientSide(
        _a(agent, "server-ca.crt"), _a(agent, "client-kubelet.crt"), _a(agent, "client-kubelet.key")
    )
    result = handshake(api, kubelet)
    assert result.ok, result.error
    # API server -> kubelet: the agent's serving cert, the server's kubelet-client cert
    serving = ServerSide(
        _a(agent, "serving-kubelet.crt"),
        _a(agent, "serving-kubelet.key"),
        _a(agent, "client-ca.crt"),
    )
    apiserver_client = ClientSide(
        server.file("server-ca.crt"),
        server.file("client-kube-apiserver.crt"),
        server.file("client-kube-apiserver.key"),
        server_name="agent-1",
    )
    result = handshake(serving, apiserver_client)
    assert result.ok, result.error
    # and a client cert from a foreign CA is refused by the same server
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    other = ClientSide(_a(agent, "server-ca.crt"), *_foreign_client(foreign))
    assert not handshake(api, other).ok


def _foreign_client(directory: Path) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    ca_key, key = keys.new_ec_key(), keys.new_ec_key()
    ca = build.self_signed_ca("rke2-client-ca@1", ca_key, now)
    leaf = build.leaf(
        "system:node:agent-1", ("system:nodes",), "client", (), key.public_key(), ca, ca_key, now
    )
    (directory / "c.crt").write_bytes(certs.bundle_pem([leaf, ca]))
    (directory / "c.key").write_bytes(keys.key_to_pem(key))
    return directory / "c.crt", directory / "c.key"


def test_new_server_ca_old_token_refused_new_token_reissues(
    agent_factory: Callable[..., Node], server: ServerNode, endpoint: SupervisorHandle
):
    agent = agent_factory()
    renew_agent(agent)
    keys_before = {n: public_key_der(_a(agent, f"{n}.key")) for n in LEAVES}
    old_token = server.agent_token
    # The server gets a new CA set (all CA files replaced), then new tokens, as after a rotation.
    for name in CA_NAMES:
        server.layout.ca_cert(name).unlink()
        server.layout.ca_key(name).unlink()
    with node_lock(server.layout.data_dir, 30):
        renew(server.node, datetime.now(UTC))
    write_tokens(server.layout, server.password)
    assert server.agent_token != old_token

    before = snapshot(agent.layout.data_dir)
    signed = endpoint.signed_count
    with pytest.raises(TokenError) as err:
        renew_agent(agent)  # the endpoint picked up the new CA without a restart
    assert "does not match" in str(err.value) and "agent-token" in str(err.value)
    assert snapshot(agent.layout.data_dir) == before
    assert endpoint.signed_count == signed

    agent = agent_factory(token=server.agent_token)  # the operator puts in the new token
    result = renew_agent(agent)
    assert len(result.changes) == 4
    assert all("signed by another CA" in "; ".join(c.reasons) for c in result.changes)
    assert not any(c.new_key for c in result.changes)
    for name in LEAVES:
        assert public_key_der(_a(agent, f"{name}.key")) == keys_before[name]
    assert _a(agent, "server-ca.crt").read_bytes() == server.file("server-ca.crt").read_bytes()
    res = openssl(
        "verify", "-CAfile", server.file("client-ca.crt"), _a(agent, "client-kubelet.crt")
    )
    assert res.returncode == 0, res.stdout


def test_server_roles_are_refused(server: ServerNode):
    with pytest.raises(UsageError, match="server role"):
        agent_renew(server.node, datetime.now(UTC))
    with pytest.raises(UsageError, match="server role"):
        agent_rotate(server.node, [], datetime.now(UTC))


def test_interrupted_write_is_recovered(agent: Node):
    """A temp file left by a crash is removed by the next run (files.atomic.recover)."""
    renew_agent(agent)
    stray = agent.layout.agent / ".rke2certd-tmp-client-kubelet.crt.dead"
    shutil.copy(_a(agent, "client-kubelet.crt"), stray)
    result = renew_agent(agent)
    assert not stray.exists()
    assert result.repaired and result.changes == []
