"""Threats to the agent endpoint (supervisor-port), each tried as an attacker would: the real
endpoint over real TLS on loopback, a real SQLite datastore behind the cluster route, real files.

T10  slowloris: slow or idle connections must not lock other clients out
T11  serving-cert impersonation: an agent asks for a cert naming the apiserver or a server
T12  agents writing as other nodes: the node name must be proved (node password)
T13  deep JSON: the parser's recursion must not drop the connection
T14  credentials: which user/password grants what; secrets in files others can read
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from rke2certd.commands.agent import node_password
from rke2certd.commands.status import remove_node
from rke2certd.config import Config
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import ConfigError
from rke2certd.node.bootstrap_data import configured_token
from rke2certd.node.node import Node
from rke2certd.pki.join_token import format_token, parse_token
from rke2certd.plan.rollout import (
    PHASES,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor import (
    CLUSTER_PATH,
    MAX_PER_ADDRESS,
    MAX_UNAUTHENTICATED,
    NODE_IP_HEADER,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    wire,
)
from rke2certd.supervisor.client import RefusedError, fetch_cacerts
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.server import Limits, SupervisorHandle, start
from tests.agent.helpers import (
    HOST,
    ServerNode,
    basic,
    call,
    make_agent_node,
    make_csr,
    raw_exchange,
    renew_agent,
    status_of,
)

from .conftest import NOW
from .slowloris import Attacker, wait_accepted

Events = list[dict[str, Any]]
SERVING = "/v1-rke2/serving-kubelet.crt"
KUBELET = "/v1-rke2/client-kubelet.crt"
CLIENT_CA = "/v1-rke2/client-ca.crt"
NEEDS_SS = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
GENEROUS = 60.0  # a failure timeout only: nothing here asserts how fast anything is


def _csr_headers(
    server: ServerNode, name: str, ips: str = "10.0.0.21", password: str | None = "pw-1"
) -> dict[str, str]:
    headers = {
        **basic("node", server.password),
        "Content-Type": "application/octet-stream",
        NODE_NAME_HEADER: name,
        NODE_IP_HEADER: ips,
    }
    if password is not None:
        headers[NODE_PASSWORD_HEADER] = password
    return headers


def _post_csr(endpoint: SupervisorHandle, server: ServerNode, path: str, **kw: Any) -> Any:
    return call(
        endpoint.port,
        server.file("server-ca.crt"),
        "POST",
        path,
        make_csr(),
        _csr_headers(server, **kw),
    )


def _cluster(
    endpoint: SupervisorHandle,
    server: ServerNode,
    doc: object,
    name: str | None,
    password: str | None,
) -> tuple[int, str]:
    headers = {**basic("node", server.password), "Content-Type": "application/json"}
    if name is not None:
        headers[NODE_NAME_HEADER] = name
    if password is not None:
        headers[NODE_PASSWORD_HEADER] = password
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    reply = call(endpoint.port, server.file("server-ca.crt"), "POST", CLUSTER_PATH, body, headers)
    return reply.status, reply.body.decode(errors="replace")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _everything(store: SQLiteDatastore) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in store.get_prefix("/")}


def _refusals(events: Events) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "request_refused"]


# T10 Slowloris ---------------------------------------------------------------------------------


@pytest.fixture
def held(server: ServerNode, store: SQLiteDatastore) -> Iterator[SupervisorHandle]:
    """The endpoint with a deadline longer than any of these tests: the attackers' connections
    stay held for as long as the test looks (the deadline has a test of its own)."""
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
    with start(server.node, host=HOST, port=0, cluster=api, limits=Limits(deadline=600)) as h:
        yield h


@pytest.fixture
def attackers(held: SupervisorHandle) -> Iterator[list[Attacker]]:
    made: list[Attacker] = []
    yield made
    for a in made:
        a.close()


def _cacerts(endpoint: SupervisorHandle, server: ServerNode) -> bytes:
    reply = call(endpoint.port, server.file("server-ca.crt"), "GET", "/cacerts")
    assert reply.status == 200
    return reply.body


def test_t10_one_address_trickling_128_tls_connections_blocks_no_one(
    held: SupervisorHandle, server: ServerNode, attackers: list[Attacker]
) -> None:
    """128 TLS connections from 127.0.0.2 each trickle a request; a client from 127.0.0.1 is
    still served (its socket timeout is the failure timeout, not a bound being tested)."""
    attacker = Attacker(HOST, held.port, "127.0.0.2")
    attackers.append(attacker)
    attacker.open(128)
    attacker.trickle(0.5)
    assert 0 < attacker.still_open() <= MAX_PER_ADDRESS  # the others were refused at once
    assert _cacerts(held, server) == server.file("server-ca.crt").read_bytes()
    # and an agent's authenticated request too
    reply = call(
        held.port,
        server.file("server-ca.crt"),
        "GET",
        "/v1-rke2/client-ca.crt",
        headers=basic("node", server.password),
    )
    assert reply.status == 200


@NEEDS_SS
def test_t10_130_idle_tcp_connections_block_no_one(
    held: SupervisorHandle, server: ServerNode, attackers: list[Attacker]
) -> None:
    attacker = Attacker(HOST, held.port, "127.0.0.2")
    attackers.append(attacker)
    # one by one, each taken by the server before the next: so many are not lost in the
    # kernel's queue (the server must really hold or refuse them)
    attacker.open(130, tls=False, settle=lambda: wait_accepted(held.port))
    assert attacker.still_open() <= MAX_PER_ADDRESS
    assert _cacerts(held, server) == server.file("server-ca.crt").read_bytes()


def test_t10_many_addresses_cannot_crowd_out_clients(
    held: SupervisorHandle, server: ServerNode, attackers: list[Attacker]
) -> None:
    """Eight addresses hold all they may (16 each, 128 in all): unauthenticated connections are
    capped, the oldest is cut for a newcomer, and agents keep places of their own."""
    for i in range(2, 10):
        attacker = Attacker(HOST, held.port, f"127.0.0.{i}")
        attackers.append(attacker)
        attacker.open(MAX_PER_ADDRESS)
    assert _cacerts(held, server) == server.file("server-ca.crt").read_bytes()
    reply = call(
        held.port,
        server.file("server-ca.crt"),
        "GET",
        "/v1-rke2/client-ca.crt",
        headers=basic("node", server.password),
    )
    assert reply.status == 200
    assert sum(a.still_open() for a in attackers) <= MAX_UNAUTHENTICATED


def test_t10_a_trickling_connection_is_cut_at_its_deadline(
    server: ServerNode, tmp_path: Path, events: Events
) -> None:
    """A deadline for handshake + headers + body in total: a connection that sends a byte every
    0.2 s (each socket read succeeds) is still cut, as is one that never starts its handshake."""
    with (
        SQLiteDatastore(tmp_path / "pw.sqlite") as passwords,
        start(
            server.node, host=HOST, port=0, passwords=passwords, limits=Limits(deadline=1.0)
        ) as handle,
    ):
        trickler = Attacker(HOST, handle.port, "127.0.0.2")
        idle = Attacker(HOST, handle.port, "127.0.0.3")
        try:
            assert trickler.open(1) == 1
            assert idle.open(1, tls=False) == 1
            trickler.trickle(0.2)
            assert trickler.wait_all_closed(GENEROUS) == 0
            assert idle.wait_all_closed(GENEROUS) == 0
        finally:
            trickler.close()
            idle.close()
    cut = [e for e in events if e["event"] == "connection_cut"]
    assert cut and all("within 1 s" in e["reason"] for e in cut)


@NEEDS_SS
def test_t10_listen_backlog_is_not_five(endpoint: SupervisorHandle) -> None:
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{endpoint.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[2]) >= 128  # Send-Q of a listening socket: its backlog


# T11 Serving-cert impersonation ------------------------------------------------------------------

FORBIDDEN = [
    ("kubernetes.default.svc.cluster.local", "10.43.0.1"),  # the exact request
    ("kubernetes", "10.0.0.21"),
    ("kubernetes.default", "10.0.0.21"),
    ("kubernetes.default.svc", "10.0.0.21"),
    ("metrics.kube-system.svc.cluster.local", "10.0.0.21"),
    ("cluster.local", "10.0.0.21"),
    ("server-1", "10.0.0.21"),  # this server's own name
    ("agent-1", "10.43.0.1"),  # the first service IP
    ("agent-1", "10.43.200.9"),  # anywhere in the service CIDR
    ("agent-1", "0.0.0.0"),
    ("agent-1", "::"),
    ("agent-1", "255.255.255.255"),
    ("agent-1", "224.0.0.1"),
    ("agent-1", "ff02::1"),
    ("agent-1", "fe80::1%eth0"),
    ("agent-1", "127.0.0.2"),
    ("agent-1", "::1"),
    ("agent-1", "::ffff:10.43.0.1"),
    ("agent-1", "10.0.0.11"),  # this server's own address
    ("10.43.0.1", "10.0.0.21"),  # a node name that is a service IP
]


@pytest.mark.parametrize(("name", "ip"), FORBIDDEN)
def test_t11_serving_cert_never_names_what_an_agent_is_not(
    endpoint: SupervisorHandle, server: ServerNode, events: Events, name: str, ip: str
) -> None:
    before = endpoint.signed_count
    reply = _post_csr(endpoint, server, SERVING, name=name, ips=ip)
    assert reply.status == 403, reply.body
    assert b"never signs for an agent" in reply.body
    assert endpoint.signed_count == before
    assert any(e["http_status"] == 403 and "never signs" in e["reason"] for e in _refusals(events))


def test_t11_a_registered_server_name_is_refused(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore
) -> None:
    ClusterStore(store).ensure_member(Member("etcd-2", ("etcd",), Phase.ETCD))
    before = endpoint.signed_count
    for route in (SERVING, KUBELET):
        reply = _post_csr(endpoint, server, route, name="etcd-2", password="fresh")
        assert reply.status == 403 and b"is a server node" in reply.body
    assert endpoint.signed_count == before
    assert store.get(rec.node_password_key("etcd-2")) is None  # the name was not taken either


def test_t11_an_agents_own_names_are_still_signed(
    endpoint: SupervisorHandle, server: ServerNode
) -> None:
    reply = _post_csr(endpoint, server, SERVING, name="agent-1", ips="10.0.0.21,fd00::21")
    assert reply.status == 200
    leaf = x509.load_pem_x509_certificate(reply.body)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"agent-1", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.21",
        "fd00::21",
        "127.0.0.1",
    }


# T12 Agents writing as other nodes ---------------------------------------------------------------


ROLLOUT = Rollout(
    "ca-1", RolloutKind.CA, "gen1", PHASES, None, RolloutState.ACTIVE, "test", NOW, "e1"
)


@pytest.fixture
def cluster(store: SQLiteDatastore) -> ClusterStore:
    """A server e1 (member, registered) in an active CA rollout, as its own daemon wrote it."""
    cs = ClusterStore(store)
    lease = store.grant_lease(60)
    cs.ensure_member(Member("e1", ("etcd",), Phase.ETCD))
    cs.register(Registration("e1", ("etcd",), Phase.ETCD, "t", None), lease)
    cs.create_rollout(ROLLOUT, NOW)
    return cs


def _put(key: str, value: bytes) -> dict[str, Any]:
    return {"op": "put", "key": _b64(key), "value": _b64(value)}


def test_t12_a_forged_failure_for_a_server_is_refused_and_the_rollout_goes_on(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore, cluster: ClusterStore
) -> None:
    before = _everything(store)
    failed = rec.encode_status(NodeStatus("e1", NodeState.FAILED, "forged"))
    for doc in (
        _put(rec.status_key("ca-1", "e1"), failed),
        {"op": "create", "key": _b64(rec.status_key("ca-1", "e1")), "value": _b64(failed)},
    ):
        status, body = _cluster(endpoint, server, doc, "e1", "any-password")
        assert status == 403 and "is a server node" in body
    status, _ = _cluster(endpoint, server, {"op": "housekeep"}, "agent-1", "pw-a1")
    assert status == 200
    assert store.get(rec.status_key("ca-1", "e1")) is None
    rollout = cluster.read().view.rollout("ca-1")
    assert rollout is not None and rollout.state is RolloutState.ACTIVE
    changed = {k for k, v in _everything(store).items() if before.get(k) != v}
    assert changed <= {rec.node_password_key("agent-1")}  # only agent-1's own first use


def test_t12_a_servers_records_are_never_an_agents(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore, cluster: ClusterStore
) -> None:
    before = _everything(store)
    as_agent = Registration("e1", ("agent",), Phase.AGENT, "t", None)
    attempts = [
        _put(rec.update_key("e1"), rec.encode_registration(as_agent)),
        _put(rec.node_key("e1"), rec.encode_registration(as_agent)),
        _put(rec.member_key("e1"), rec.encode_member(Member("e1", ("agent",), Phase.AGENT))),
        {"op": "delete", "key": _b64(rec.node_key("e1"))},
        {"op": "delete", "key": _b64(rec.member_key("e1"))},
    ]
    for doc in attempts:
        status, body = _cluster(endpoint, server, doc, "e1", "any-password")
        assert status == 403 and "is a server node" in body, (doc, status, body)
    assert _everything(store) == before


def test_t12_a_node_name_belongs_to_the_first_password(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore, events: Events
) -> None:
    own = Registration("agent-1", ("agent",), Phase.AGENT, "t", None)
    doc = _put(rec.update_key("agent-1"), rec.encode_registration(own))
    assert _cluster(endpoint, server, doc, "agent-1", "the-first")[0] == 200
    before, signed = _everything(store), endpoint.signed_count
    impostor = Registration("agent-1", ("agent",), Phase.AGENT, "forged", None)
    doc = _put(rec.update_key("agent-1"), rec.encode_registration(impostor))
    status, body = _cluster(endpoint, server, doc, "agent-1", "another")
    assert status == 403 and "another node password" in body
    status, body = _cluster(endpoint, server, {"op": "delete", "key": doc["key"]}, "agent-1", None)
    assert status == 400 and NODE_PASSWORD_HEADER in body
    for route in (SERVING, KUBELET):
        assert _post_csr(endpoint, server, route, name="agent-1", password="another").status == 403
        assert _post_csr(endpoint, server, route, name="agent-1", password=None).status == 400
    assert _everything(store) == before and endpoint.signed_count == signed
    assert sum(1 for e in _refusals(events) if "another node password" in e["reason"]) == 3
    # the datastore holds a salted hash, never the password, out of the agents' reach
    record = store.get(rec.node_password_key("agent-1"))
    assert record is not None and b"the-first" not in record.value
    key = _b64(rec.node_password_key("agent-1"))
    status, _ = _cluster(endpoint, server, {"op": "get", "key": key}, "agent-1", "the-first")
    assert status == 403


def test_t12_node_remove_frees_the_name(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore
) -> None:
    ClusterStore(store).ensure_member(Member("agent-1", ("agent",), Phase.AGENT))
    assert _post_csr(endpoint, server, KUBELET, name="agent-1", password="old").status == 200
    remove_node(store, "agent-1", force=False)
    assert _post_csr(endpoint, server, KUBELET, name="agent-1", password="new").status == 200


def test_t12_agents_create_their_password_and_an_impostor_is_refused(
    endpoint: SupervisorHandle, server: ServerNode, store: SQLiteDatastore, tmp_path: Path
) -> None:
    """A real agent renew creates the node password file at first need (0600, 128 bits hex),
    keeps it, and proves its name with it; another node claiming that name writes nothing."""
    agent = make_agent_node(
        tmp_path / "a1", server.agent_token, "agent-1", supervisor_port=endpoint.port
    )
    pw_file = agent.cfg.node_password_file
    assert not pw_file.exists()
    assert len(renew_agent(agent).changes) == 4
    assert pw_file.stat().st_mode & 0o777 == 0o600
    first = pw_file.read_text()
    assert len(first.strip()) == 32 and int(first, 16) >= 0
    assert node_password(agent) == first.strip() and pw_file.read_text() == first
    impostor = make_agent_node(
        tmp_path / "a1-again", server.agent_token, "agent-1", supervisor_port=endpoint.port
    )
    with pytest.raises(RefusedError) as err:
        renew_agent(impostor)
    assert err.value.status == 403 and "node-password-file" in str(err.value)
    assert not (impostor.layout.agent / "client-kubelet.crt").exists()


def test_t12_an_empty_password_file_is_a_clear_error(server: ServerNode, tmp_path: Path) -> None:
    agent = make_agent_node(tmp_path / "a1", server.agent_token, "agent-1")
    agent.cfg.node_password_file.write_text("\n")
    with pytest.raises(ConfigError) as err:
        node_password(agent)
    assert "node-password-file" in str(err.value.problems)


# T13 Deep JSON ---------------------------------------------------------------------------------


def test_t13_deeply_nested_json_is_a_400_not_a_dropped_connection(
    endpoint: SupervisorHandle, server: ServerNode
) -> None:
    body = b"[" * 30_000
    head = (
        f"POST {CLUSTER_PATH} HTTP/1.1\r\nHost: rke2\r\nContent-Type: application/json\r\n"
        f"Authorization: {basic('node', server.password)['Authorization']}\r\n"
        f"{NODE_NAME_HEADER}: agent-1\r\n{NODE_PASSWORD_HEADER}: pw\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = raw_exchange(endpoint.port, server.file("server-ca.crt"), head + body)
    assert status_of(answer) == 400 and b"nests deeper" in answer
    # a deep object inside a string is only text
    ok = json.dumps({"op": "get", "key": _b64("/rke2certd/x"), "pad": "[" * 30_000})
    assert _cluster(endpoint, server, ok.encode(), "agent-1", "pw")[0] == 200


def test_t13_the_agent_side_bounds_depth_too() -> None:
    with pytest.raises(wire.WireError):
        wire.loads(b'{"a":' * 20_000 + b"1" + b"}" * 20_000, 32)


# T14 Credentials ---------------------------------------------------------------------------------


@pytest.fixture
def split_tokens(server: ServerNode) -> tuple[str, str]:
    """RKE2 with `agent-token` set: the agent token's password is not the server token's."""
    ca_hash = parse_token(server.agent_token).ca_hash or ""
    (server.layout.server / "token").write_text(format_token(ca_hash, "server", "srv-pass") + "\n")
    agent_token = format_token(ca_hash, "node", "agent-pass")
    (server.layout.server / "agent-token").write_text(agent_token + "\n")
    for name in ("token", "agent-token"):
        (server.layout.server / name).chmod(0o600)
    return "srv-pass", "agent-pass"


def test_t14_an_agent_password_never_makes_a_server(
    endpoint: SupervisorHandle, server: ServerNode, split_tokens: tuple[str, str]
) -> None:
    server_pw, agent_pw = split_tokens
    ca = server.file("server-ca.crt")
    route = "/v1-rke2/server-bootstrap"
    assert call(endpoint.port, ca, "GET", route, headers=basic("server", agent_pw)).status == 403
    assert call(endpoint.port, ca, "GET", route, headers=basic("node", agent_pw)).status == 403
    assert call(endpoint.port, ca, "GET", route, headers=basic("server", server_pw)).status == 501
    assert call(endpoint.port, ca, "GET", route, headers=basic("server", "nope")).status == 401
    # the agent routes take either user with the agent password
    for user in ("node", "server"):
        reply = call(
            endpoint.port, ca, "GET", "/v1-rke2/client-ca.crt", headers=basic(user, agent_pw)
        )
        assert reply.status == 200


def _secret_warnings(events: Events) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "secret_file_exposed"]


def test_t14_a_token_others_can_read_is_warned_about_once_per_file(
    tmp_path: Path, events: Events
) -> None:
    from rke2certd.config import load_config

    token_file = tmp_path / "token"
    token_file.write_text("K10" + "0" * 64 + "::node:secret-pass\n")
    conf = tmp_path / "rke2certd.yaml"
    conf.write_text(f"data-dir: {tmp_path / 'data'}\ntoken: K10::node:other-pass\n")
    for path, mode in ((token_file, 0o640), (conf, 0o644)):
        os.chmod(path, mode)
    cfg = load_config(conf)
    for _ in range(3):
        assert configured_token(cfg, Node.from_config(cfg).layout) == "K10::node:other-pass"
    by_file = Config.from_mapping(
        {"data-dir": str(tmp_path / "data"), "token-file": str(token_file)}
    )
    for _ in range(3):
        configured_token(by_file, Node.from_config(by_file).layout)
    warned = _secret_warnings(events)
    assert sorted(e["path"] for e in warned) == sorted([str(conf), str(token_file)])
    assert all("chmod 600" in e["reason"] and "pass" not in json.dumps(e) for e in warned)
    # private files: no warning
    events.clear()
    os.chmod(token_file, 0o600)
    os.chmod(conf, 0o600)
    configured_token(load_config(conf), Node.from_config(cfg).layout)
    configured_token(by_file, Node.from_config(by_file).layout)
    assert _secret_warnings(events) == []


def test_t14_a_node_password_file_others_can_read_is_warned_about(
    server: ServerNode, tmp_path: Path, events: Events
) -> None:
    agent = make_agent_node(tmp_path / "a1", server.agent_token, "agent-1")
    agent.cfg.node_password_file.write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(agent.cfg.node_password_file, 0o644)
    node_password(agent)
    node_password(agent)
    assert [e["path"] for e in _secret_warnings(events)] == [str(agent.cfg.node_password_file)]


def test_t14_cacerts_stays_open(endpoint: SupervisorHandle, server: ServerNode) -> None:
    """The fixes above leave the one unauthenticated route as it was: agents pin it."""
    assert fetch_cacerts(f"https://{HOST}:{endpoint.port}", server.agent_token) == (
        server.file("server-ca.crt").read_bytes()
    )
