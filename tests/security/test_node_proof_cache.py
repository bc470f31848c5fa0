"""What re-proving a node's name and reading the tokens cost each request, and what they may
never cost in security: the real endpoint over TLS, a real SQLite store whose reads are counted,
real token files, and an injected monotonic clock for the proof's bound (node_auth.PROOF_TTL).

Figures (asserted below): a node's first request reads the datastore 3 times (its password
record, its membership, its registration) and records its password; every later request within
PROOF_TTL reads nothing; the first past it reads 3 times again. A wrong password reads 3 times,
every time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.status import remove_node
from rke2certd.datastore.base import KV, Snapshot
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.pki.join_token import format_token, parse_token
from rke2certd.plan.rollout import Member, Phase
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor import (
    CLUSTER_PATH,
    NODE_IP_HEADER,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    node_auth,
)
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.node_auth import FORGET_AFTER, PROOF_TTL, NodePasswords, NodeRefused
from rke2certd.supervisor.server import SupervisorHandle, start
from tests.agent.helpers import HOST, ServerNode, basic, call, make_csr

from .conftest import NOW

KUBELET = "/v1-rke2/client-kubelet.crt"
CLIENT_CA = "/v1-rke2/client-ca.crt"
FIRST_USE_READS = 3  # the password record, the membership, the registration


class CountingStore(SQLiteDatastore):
    """The real SQLite store; it counts the reads made through it (it does not mock them)."""

    reads = 0

    def get(self, key: str) -> KV | None:
        self.reads += 1
        return super().get(key)

    def snapshot(self, prefix: str) -> Snapshot:
        self.reads += 1
        return super().snapshot(prefix)

    def taken(self) -> int:
        """The reads since the last call."""
        n, self.reads = self.reads, 0
        return n


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[CountingStore]:
    with CountingStore(tmp_path / "passwords.sqlite") as ds:
        yield ds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def proving(
    server: ServerNode, store: SQLiteDatastore, counted: CountingStore, clock: Clock
) -> Iterator[SupervisorHandle]:
    """The endpoint, its node passwords in `counted` (so only the proofs are counted)."""
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
    with start(
        server.node, host=HOST, port=0, cluster=api, passwords=counted, proof_clock=clock
    ) as handle:
        yield handle


def _as_node(endpoint: SupervisorHandle, server: ServerNode, route: str, password: str) -> int:
    headers = {**basic("node", server.password), NODE_NAME_HEADER: "agent-1"}
    headers[NODE_PASSWORD_HEADER] = password
    ca = server.file("server-ca.crt")
    if route == KUBELET:
        headers |= {"Content-Type": "application/octet-stream", NODE_IP_HEADER: "10.0.0.21"}
        return call(endpoint.port, ca, "POST", route, make_csr(), headers).status
    headers["Content-Type"] = "application/json"
    doc = json.dumps({"op": "get", "key": "L3JrZTJjZXJ0ZC94"}).encode()  # /rke2certd/x
    return call(endpoint.port, ca, "POST", route, doc, headers).status


# The proof cache, through the endpoint ----------------------------------------------------------


@pytest.mark.parametrize("route", [KUBELET, CLUSTER_PATH])
def test_a_proven_node_costs_no_read_within_the_bound(
    proving: SupervisorHandle, server: ServerNode, counted: CountingStore, clock: Clock, route: str
) -> None:
    assert _as_node(proving, server, route, "pw-1") == 200
    assert counted.taken() == FIRST_USE_READS
    for _ in range(5):
        clock.now += PROOF_TTL / 6
        assert _as_node(proving, server, route, "pw-1") == 200
        assert counted.taken() == 0
    clock.now += PROOF_TTL / 6  # past the bound: checked in full, then trusted again
    assert _as_node(proving, server, route, "pw-1") == 200
    assert counted.taken() == FIRST_USE_READS
    assert _as_node(proving, server, route, "pw-1") == 200
    assert counted.taken() == 0


def test_a_wrong_password_is_checked_and_refused_every_time(
    proving: SupervisorHandle, server: ServerNode, counted: CountingStore
) -> None:
    assert _as_node(proving, server, KUBELET, "pw-1") == 200
    counted.taken()
    for _ in range(3):
        assert _as_node(proving, server, KUBELET, "another") == 403
        assert counted.taken() == FIRST_USE_READS
    assert _as_node(proving, server, KUBELET, "pw-1") == 200  # the node's proof stands
    assert counted.taken() == 0


# The proof cache, on its own --------------------------------------------------------------------


def _servers(counted: CountingStore, clock: Clock) -> tuple[NodePasswords, NodePasswords]:
    return NodePasswords(counted, "server-1", clock), NodePasswords(counted, "server-2", clock)


def _remove(ds: CountingStore, name: str) -> None:
    """`rke2certd node remove` of an agent that had joined (a member of phase agent)."""
    ClusterStore(ds).ensure_member(Member(name, ("agent",), Phase.AGENT))
    remove_node(ds, name, force=False)


def test_a_refusal_is_never_remembered(counted: CountingStore, clock: Clock) -> None:
    here, _ = _servers(counted, clock)
    here.check("agent-1", "pw-1")
    for bad in ("pw-2", "pw-1 ", "PW-1"):
        for _ in range(2):
            with pytest.raises(NodeRefused) as err:
                here.check("agent-1", bad)
            assert err.value.status == 403
    assert here.proven == 1
    for bad in ("", "x" * 300, "tab\there"):
        with pytest.raises(NodeRefused) as err:
            here.check("agent-1", bad)
        assert err.value.status == 400


def test_node_remove_lets_a_new_password_in_at_once(counted: CountingStore, clock: Clock) -> None:
    """Another machine takes the name after `node remove`: its password works at once on every
    server; the old one stops at once where the new one was seen, elsewhere within PROOF_TTL."""
    here, there = _servers(counted, clock)
    here.check("agent-1", "old")
    there.check("agent-1", "old")
    _remove(counted, "agent-1")
    here.check("agent-1", "new")
    with pytest.raises(NodeRefused):
        here.check("agent-1", "old")
    there.check("agent-1", "old")  # its proof stands until the bound (docs/SECURITY.md)
    there.check("agent-1", "new")  # another password is checked in full: the new record
    with pytest.raises(NodeRefused):
        there.check("agent-1", "old")


def test_an_unseen_removal_is_noticed_at_the_bound(counted: CountingStore, clock: Clock) -> None:
    here, _ = _servers(counted, clock)
    here.check("agent-1", "old")
    _remove(counted, "agent-1")
    NodePasswords(counted, "server-2", clock).check("agent-1", "new")  # registered elsewhere
    here.check("agent-1", "old")
    clock.now += PROOF_TTL
    with pytest.raises(NodeRefused) as err:
        here.check("agent-1", "old")
    assert err.value.status == 403 and here.proven == 0
    here.check("agent-1", "new")


def test_a_name_that_became_a_servers_is_refused_once_the_proof_expires(
    counted: CountingStore, clock: Clock
) -> None:
    here, _ = _servers(counted, clock)
    here.check("agent-1", "pw-1")
    ClusterStore(counted).ensure_member(Member("agent-1", ("etcd",), Phase.ETCD))
    clock.now += PROOF_TTL - 1
    here.check("agent-1", "pw-1")
    clock.now += 1
    for _ in range(2):
        with pytest.raises(NodeRefused) as err:
            here.check("agent-1", "pw-1")
        assert err.value.status == 403 and "is a server node" in err.value.reason
    assert here.proven == 0
    with pytest.raises(NodeRefused):
        here.check("server-1", "pw-1")  # this server's own name: never, proof or not


def test_proofs_of_names_gone_quiet_are_dropped(
    counted: CountingStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table holds about twice the names proven within FORGET_AFTER, whatever has been."""
    monkeypatch.setattr(node_auth, "MIN_PRUNE_MARK", 4)
    here = NodePasswords(counted, "server-1", clock)
    for i in range(4):
        here.check(f"old-{i}", "pw")
    assert here.proven == 4  # the mark reached: none old enough to drop, the mark doubles
    clock.now += FORGET_AFTER
    here.check("old-0", "pw")  # still asking: its proof is renewed
    for i in range(4):
        here.check(f"new-{i}", "pw")
    assert here.proven == 5  # old-1..3 dropped at the mark (8), the mark now 10
    counted.taken()
    here.check("old-0", "pw")
    assert counted.taken() == 0
    here.check("old-1", "pw")  # a dropped proof costs a full check, never the name
    assert counted.taken() == FIRST_USE_READS and here.proven == 6
    for i in range(20):
        clock.now += FORGET_AFTER
        here.check(f"n-{i}", "pw")
    assert here.proven <= 4


def test_a_proof_is_for_that_name_only(counted: CountingStore, clock: Clock) -> None:
    here, _ = _servers(counted, clock)
    here.check("agent-1", "pw-1")
    here.check("agent-2", "pw-2")
    with pytest.raises(NodeRefused):
        here.check("agent-2", "pw-1")


# The token files ---------------------------------------------------------------------------------


def _write_token(server: ServerNode, password: str, mode: int = 0o600) -> Path:
    ca_hash = parse_token(server.agent_token).ca_hash or ""
    path: Path = server.layout.server / "agent-token"
    path.write_text(format_token(ca_hash, "node", password) + "\n")
    os.chmod(path, mode)
    return path


def _status(endpoint: SupervisorHandle, server: ServerNode, password: str) -> int:
    ca = server.file("server-ca.crt")
    return call(endpoint.port, ca, "GET", CLIENT_CA, headers=basic("node", password)).status


def test_a_rewritten_token_file_is_honoured_at_the_next_request(
    endpoint: SupervisorHandle, server: ServerNode
) -> None:
    _write_token(server, "agent-pass-1")
    assert _status(endpoint, server, "agent-pass-1") == 200
    path = _write_token(server, "agent-pass-longer")  # another size
    assert _status(endpoint, server, "agent-pass-longer") == 200
    assert _status(endpoint, server, "agent-pass-1") == 401
    before = path.stat()
    _write_token(server, "agent-pass-LONGER")  # the same size, in place: the mtime tells
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert _status(endpoint, server, "agent-pass-LONGER") == 200
    assert _status(endpoint, server, "agent-pass-longer") == 401
    # the file is read only when its stat changed: the same stat, another content, unseen
    stamp = path.stat()
    _write_token(server, "agent-pass-XXXXXX")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_ino == stamp.st_ino and path.stat().st_size == stamp.st_size
    assert _status(endpoint, server, "agent-pass-LONGER") == 200
    path.unlink()  # gone: the configured token (the server token here) again
    assert _status(endpoint, server, server.password) == 200
    assert _status(endpoint, server, "agent-pass-LONGER") == 401


def test_a_token_file_others_can_read_is_still_warned_about_once(
    endpoint: SupervisorHandle, server: ServerNode, events: list[dict[str, Any]]
) -> None:
    path = _write_token(server, "agent-pass-1")
    assert _status(endpoint, server, "agent-pass-1") == 200
    os.chmod(path, 0o644)  # a chmod changes no mtime, size or inode: the mode is watched too
    for _ in range(3):
        assert _status(endpoint, server, "agent-pass-1") == 200
    warned = [e for e in events if e["event"] == "secret_file_exposed"]
    assert [e["path"] for e in warned] == [str(path)]
    assert "agent-pass" not in json.dumps(warned)
