"""The endpoint's rules as pure functions: which SANs an agent never gets, how deep a document
may nest, how node passwords are stored, and which connection the gate admits or cuts (with
socket pairs: the gate only shuts sockets down, which a pair shows at once)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from rke2certd.supervisor import wire
from rke2certd.supervisor.limits import ConnectionGate, Refusal, Ticket
from rke2certd.supervisor.node_auth import SanPolicy, hash_record, matches, refused_sans

POLICY = SanPolicy("cluster.local", ("10.43.0.0/16", "fd00:43::/112"), ("server-1", "10.0.0.11"))


@pytest.mark.parametrize(
    ("names", "ips", "why"),
    [
        (["kubernetes.default.svc.cluster.local"], [], "apiserver name"),
        (["KUBERNETES"], [], "apiserver name"),
        (["x.svc.cluster.local."], [], "cluster domain"),
        (["server-1"], [], "this server"),
        ([], ["fd00:43::1"], "service CIDR"),
        ([], ["::ffff:255.255.255.255"], "broadcast"),
        ([], ["fe80::1%2"], "zone"),
        ([], ["127.1.2.3"], "loopback"),
        ([], ["0.0.0.0"], "unspecified"),
        ([], ["239.1.1.1"], "multicast"),
        (["10.0.0.11"], [], "this server"),
    ],
)
def test_refused_sans(names: list[str], ips: list[str], why: str) -> None:
    problems = refused_sans(names, ips, POLICY)
    assert problems and any(why in p for p in problems), problems


def test_an_agents_own_sans_pass_and_every_problem_is_listed() -> None:
    assert (
        refused_sans(
            ["agent-1", "kubernetes-worker-7", "127.0.0.1"],
            ["10.0.0.21", "fe80::1", "fd00::21"],
            POLICY,
        )
        == []
    )
    assert len(refused_sans(["kubernetes"], ["0.0.0.0", "10.43.0.1"], POLICY)) == 3


def test_json_nesting_is_bounded_and_brackets_in_strings_do_not_count() -> None:
    assert wire.loads(b'{"a": [1, {"b": "[[[[\\"[["}]}', 3) == {"a": [1, {"b": '[[[["[['}]}
    with pytest.raises(wire.WireError, match="nests deeper than 2"):
        wire.loads(b'{"a": [1, {"b": "[[[[\\"[["}]}', 2)
    for bomb in (
        b"[" * 30_000,
        b"[" * 30_000 + b"]" * 30_000,
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    ):
        with pytest.raises(wire.WireError, match="nests deeper than 32"):
            wire.loads(bomb, 32)  # refused, never a RecursionError
    assert wire.container_depth([[], [[[]]], {"a": {}}], 32) == 4
    assert wire.container_depth([[[[[]]]]], 2) == 3  # counted only until past the limit
    assert wire.loads(b'{"a": [[1]]}', 3) == {"a": [[1]]}
    with pytest.raises(wire.WireError):
        wire.loads(b'{"a": [[1]]}', 2)
    with pytest.raises(wire.WireError):
        wire.loads(b"{nope", 32)


def test_node_password_records_are_salted_hashes() -> None:
    one, two = hash_record("s3cret"), hash_record("s3cret")
    assert one != two and b"s3cret" not in one
    assert matches(one, "s3cret") and matches(two, "s3cret")
    assert not matches(one, "s3cret ") and not matches(b"{}", "s3cret")
    assert not matches(b"not json", "s3cret")


@pytest.fixture
def gate() -> Iterator[ConnectionGate]:
    g = ConnectionGate(max_total=6, max_pending=4, per_address=2, deadline=3600)
    yield g
    g.stop()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def _admit(
    gate: ConnectionGate, pairs: list[tuple[socket.socket, socket.socket]], address: str
) -> tuple[Ticket | Refusal, socket.socket]:
    ours, theirs = socket.socketpair()
    pairs.append((ours, theirs))
    return gate.admit(address, ours), theirs


def _cut(peer: socket.socket) -> bool:
    peer.settimeout(5)  # a failure bound only: a shut-down pair reads EOF at once
    try:
        return peer.recv(1) == b""
    except TimeoutError:
        return False


def test_gate_per_address_cap_and_oldest_pending_cut(
    gate: ConnectionGate, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    a1, p1 = _admit(gate, pairs, "10.0.0.1")
    a2, _ = _admit(gate, pairs, "10.0.0.1")
    refused, _ = _admit(gate, pairs, "10.0.0.1")
    assert isinstance(a1, Ticket) and isinstance(a2, Ticket) and isinstance(refused, Refusal)
    _admit(gate, pairs, "10.0.0.2")
    _admit(gate, pairs, "10.0.0.2")
    assert gate.counts() == (4, 4)
    newcomer, _ = _admit(gate, pairs, "10.0.0.3")  # pending is full: the oldest makes room
    assert isinstance(newcomer, Ticket)
    assert _cut(p1) and a1.why.startswith("cut to make room")
    assert gate.counts() == (4, 4)
    gate.release(a1)
    again, _ = _admit(gate, pairs, "10.0.0.1")  # its address has a place again
    assert isinstance(again, Ticket)


def test_gate_keeps_places_for_authenticated_connections(
    gate: ConnectionGate, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    agents = []
    for i in range(6):
        t, _ = _admit(gate, pairs, f"10.0.1.{i}")
        assert isinstance(t, Ticket)
        gate.promote(t)
        agents.append(t)
    assert gate.counts() == (6, 0)
    full, _ = _admit(gate, pairs, "10.0.2.1")  # every place is an authenticated agent's
    assert isinstance(full, Refusal)
    gate.release(agents[0])
    t, _ = _admit(gate, pairs, "10.0.2.1")
    assert isinstance(t, Ticket)
    t2, _ = _admit(gate, pairs, "10.0.2.2")  # the total is full: the pending one makes room
    assert isinstance(t2, Ticket) and t.cut and not any(a.cut for a in agents[1:])


def test_gate_resize_changes_the_total_and_cuts_nobody(
    gate: ConnectionGate, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """The fleet shrank: connections already in stay; a new one finds the smaller total full.
    The fleet grew: room again."""
    held = []
    for address in ("10.0.0.1", "10.0.0.2"):
        ticket, peer = _admit(gate, pairs, address)
        assert isinstance(ticket, Ticket)
        gate.promote(ticket)  # authenticated: never cut to make room
        held.append((ticket, peer))
    gate.resize(2)
    refused, _ = _admit(gate, pairs, "10.0.0.3")
    assert isinstance(refused, Refusal) and "2 authenticated" in refused.reason
    assert all(not t.cut for t, _ in held) and gate.counts() == (2, 0)
    gate.resize(3)
    admitted, _ = _admit(gate, pairs, "10.0.0.3")
    assert isinstance(admitted, Ticket) and gate.counts() == (3, 1)
