"""The client pins the server CA by the token's hash before it sends any credential."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.agent import supervisor_urls
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import ConfigError, TokenError
from rke2certd.pki.join_token import ca_hash, parse_token
from rke2certd.supervisor.choice import preferred_order
from rke2certd.supervisor.client import (
    RefusedError,
    SupervisorError,
    UnreachableError,
    fetch_cacerts,
    fetch_client_ca,
    pinned_context,
    request_cert,
)
from rke2certd.supervisor.server import SupervisorHandle, start

from .helpers import (
    RecordingServer,
    ServerNode,
    make_agent_node,
    make_csr,
    make_server_node,
    renew_agent,
    snapshot,
)

Events = list[dict[str, Any]]


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Callable[..., RecordingServer]]:
    made: list[RecordingServer] = []

    def build(**kwargs: Any) -> RecordingServer:
        made.append(RecordingServer(tmp_path / f"rogue-{len(made)}", **kwargs))
        return made[-1]

    yield build
    for r in made:
        r.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_credentials(rogue: RecordingServer) -> None:
    for req in rogue.requests:
        assert not {k.lower() for k in req.headers} & {"authorization", "proxy-authorization"}


def test_mismatch_refused_before_any_credential(
    recorder: Callable[..., RecordingServer], server: ServerNode
):
    rogue = recorder()
    with pytest.raises(TokenError) as err:
        fetch_cacerts(rogue.url, server.agent_token)
    wanted = parse_token(server.agent_token).ca_hash
    got = ca_hash(rogue.ca_pem)
    message = str(err.value)
    assert wanted is not None and wanted in message and got in message
    assert "server/agent-token" in message
    assert server.password not in message
    assert [(r.method, r.path) for r in rogue.requests] == [("GET", "/cacerts")]
    _no_credentials(rogue)


def test_agent_renew_against_the_wrong_cluster_writes_nothing(
    recorder: Callable[..., RecordingServer], server: ServerNode, tmp_path: Path
):
    rogue = recorder()
    node = make_agent_node(tmp_path / "agent", server.agent_token, supervisor_port=rogue.port)
    with pytest.raises(TokenError):
        renew_agent(node)
    assert snapshot(node.layout.data_dir) == {}
    assert len(rogue.requests) == 1
    _no_credentials(rogue)


def test_rogue_serving_the_real_bundle_never_gets_credentials(
    recorder: Callable[..., RecordingServer], server: ServerNode
):
    """The bundle is public: a man in the middle can serve it. Its TLS cert cannot chain to it."""
    real_bundle = server.file("server-ca.crt").read_bytes()
    rogue = recorder(cacerts=real_bundle)
    assert fetch_cacerts(rogue.url, server.agent_token) == real_bundle  # hash matches
    with pytest.raises(UnreachableError, match="does not verify against the pinned CA"):
        request_cert(
            rogue.url,
            server.agent_token,
            real_bundle,
            "client-kubelet",
            make_csr(),
            "agent-1",
            ["10.0.0.21"],
        )
    with pytest.raises(UnreachableError):
        fetch_client_ca(rogue.url, server.agent_token, real_bundle)
    assert [r.path for r in rogue.requests] == ["/cacerts"]  # the TLS handshake failed first
    _no_credentials(rogue)


def test_failover_skips_dead_and_foreign_servers(
    recorder: Callable[..., RecordingServer], server: ServerNode, tmp_path: Path, events: Events
):
    """`server` lists three servers on one port: nothing listens on .1, .2 is another cluster,
    .3 is ours (reached by an address missing from its SANs: the host name is not checked).
    The agent's name is one that ranks them in that order (each agent has its own order)."""
    passwords = SQLiteDatastore(tmp_path / "node-passwords.sqlite")
    with passwords, start(server.node, host="127.0.0.3", port=0, passwords=passwords) as ours:
        rogue = recorder(host="127.0.0.2", port=ours.port)
        servers = ",".join(f"https://127.0.0.{i}:9345" for i in (1, 2, 3))
        urls = servers.split(",")
        name = next(n for i in range(1000) if preferred_order(urls, n := f"agent-{i}") == urls)
        node = make_agent_node(
            tmp_path / "agent", server.agent_token, name, server=servers, supervisor_port=ours.port
        )
        result = renew_agent(node)
        assert len(result.changes) == 4
        assert ours.signed_count == 4
    assert [r.path for r in rogue.requests] == ["/cacerts"]
    _no_credentials(rogue)
    skipped = [e for e in events if e["event"] == "server_skipped"]
    assert any("127.0.0.1" in e["server_url"] for e in skipped)


def test_nobody_answers(server: ServerNode):
    url = f"https://127.0.0.1:{_free_port()}"
    with pytest.raises(UnreachableError, match="cannot reach the server at"):
        fetch_cacerts(f"{url},{url}", server.agent_token, timeout=2)


def test_bare_password_token_is_not_pinned(
    endpoint: SupervisorHandle, server: ServerNode, tmp_path: Path, events: Events
):
    node = make_agent_node(tmp_path / "agent", server.password, supervisor_port=endpoint.port)
    result = renew_agent(node)
    assert len(result.changes) == 4
    warnings = [e for e in events if e["event"] == "ca_not_pinned"]
    assert warnings and warnings[0]["log_level"] == "warning"
    assert server.password not in repr(events)


def test_wrong_password_is_a_clear_refusal(endpoint: SupervisorHandle, server: ServerNode):
    digest = parse_token(server.agent_token).ca_hash
    token = f"K10{digest}::node:not-the-password"
    bundle = fetch_cacerts(endpoint.url, token)  # the hash is right
    with pytest.raises(RefusedError) as err:
        fetch_client_ca(endpoint.url, token, bundle)
    assert err.value.status == 401
    assert "agent-token" in str(err.value)
    assert "not-the-password" not in str(err.value)


def test_token_hash_is_sha256_of_a_single_cert_bundle(server: ServerNode):
    bundle = server.file("server-ca.crt").read_bytes()
    assert parse_token(server.agent_token).ca_hash == hashlib.sha256(bundle).hexdigest()


def test_server_urls_take_the_supervisor_port(tmp_path: Path):
    node = make_agent_node(
        tmp_path, "t", server="https://a.example:9345, https://[fd00::1]:9345", supervisor_port=9999
    )
    assert supervisor_urls(node.cfg) == ["https://a.example:9999", "https://[fd00::1]:9999"]
    bad = make_agent_node(tmp_path, "t", server="http://a.example:9345")
    with pytest.raises(ConfigError):
        supervisor_urls(bad.cfg)
    with pytest.raises(ConfigError):
        supervisor_urls(make_agent_node(tmp_path, "t", server=None).cfg)


def test_mid_rotation_the_agent_asks_the_server_its_token_pins(
    server: ServerNode, tmp_path: Path, events: Events
):
    """Two servers with different CAs (one already rotated): the agent's token pins the second;
    the first is listed first, but signs nothing and gets no credential."""
    rotated = make_server_node(tmp_path / "rotated", name="server-2", ip="10.0.0.12")
    with (
        SQLiteDatastore(tmp_path / "node-passwords.sqlite") as passwords,
        start(server.node, host="127.0.0.3", port=0, passwords=passwords) as ours,
        start(rotated.node, host="127.0.0.2", port=ours.port, passwords=passwords) as other,
    ):
        servers = "https://127.0.0.2:9345,https://127.0.0.3:9345"
        node = make_agent_node(
            tmp_path / "agent", server.agent_token, server=servers, supervisor_port=ours.port
        )
        assert len(renew_agent(node).changes) == 4
        assert (other.signed_count, ours.signed_count) == (0, 4)
    # after pinning, the pinned server is asked first: the other one is never even tried
    assert [e for e in events if e["event"] == "server_skipped"] == []
    assert not [e for e in events if e["event"] == "request_refused"]


def test_one_pinned_context_per_bundle_and_a_new_one_after_a_rotation(tmp_path: Path):
    """Building a context parses the whole bundle: an agent builds it once per bundle (a
    request per lease refresh would otherwise pay for it), and a rotated bundle gets its own,
    which trusts only what that bundle holds."""
    first = make_server_node(tmp_path / "a", "server-a")
    second = make_server_node(tmp_path / "b", "server-b")
    old = first.file("server-ca.crt").read_bytes()
    new = second.file("server-ca.crt").read_bytes()
    ctx = pinned_context(old)
    assert pinned_context(bytearray(old)) is ctx  # the same bytes, whatever their type
    rotated = pinned_context(new)
    assert rotated is not ctx
    serials = [c["serialNumber"] for c in rotated.get_ca_certs()]
    assert serials and serials != [c["serialNumber"] for c in ctx.get_ca_certs()]
    # an unusable bundle is refused every time: a failure is never remembered as a context
    for _ in range(2):
        with pytest.raises(SupervisorError, match="pinned CA bundle is unusable"):
            pinned_context(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
