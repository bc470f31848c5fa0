"""rke2certd's daemons (`rke2certd run`, one per node) beside the RKE2 stand-in nodes, each
daemon restarting its node through the stand-in's own restart (the package's ExecStartPre=,
then RKE2's start with its reconcile: the 3 s rule). rke2certd's own config holds only the
test's restart and health commands, a free port for the agents' endpoint and short timings:
its datastore is RKE2's embedded etcd, found as on a real node from RKE2's config and unit.

- a staged cross-signed rotation rolled out in order (etcd -> control-plane -> agent) over an
  etcd-only, a control-plane-only and an agent-only node;
- a node restarted by hand before its turn in the middle of a rollout;
- upstream's `rke2 certificate rotate-ca` while the daemons run.

Each test proves that rke2certd used RKE2's etcd (its rollout records are read back from the
stand-in's etcd, and `rke2certd status` names RKE2's embedded etcd), not a fallback.

Run: python3 -m pytest -q -p no:cacheprovider tests/rke2/test_daemon_rollout.py
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rke2certd.rollout.records import PREFIX
from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.node import RKE2Agent, RKE2Server
from tests.harness.wait import SAFETY
from tests.rke2.conftest import Cluster
from tests.rke2.daemons import (
    Daemons,
    Restart,
    bootstrap_history,
    daemons_beside_standin,
    etcd_revision,
    rke2_keys,
)
from tests.rke2.test_upstream_rotate_ca import cross_signed_set

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

ROLLOUT_TIMEOUT = 300.0  # a bound on a hang, not a performance check
PHASE_ORDER = {"etcd": 0, "control-plane": 1, "agent": 2}


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    with daemons_beside_standin() as d:
        yield d


# -- helpers ---------------------------------------------------------------------------------


def _handshake(host: str, port: int, trusted: bytes) -> None:
    """A real TLS handshake by a client that trusts exactly `trusted`."""
    ctx = ssl.create_default_context(cadata=trusted.decode())
    ctx.check_hostname = False
    with (
        socket.create_connection((host, port), timeout=SAFETY) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        assert tls.version()


def _cacerts(server: RKE2Server) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(server.url + "/cacerts", timeout=SAFETY, context=ctx) as resp:
        body: bytes = resp.read()
        return body


def _openssl_verify(cafile: Path, cert: Path) -> None:
    """`openssl verify` of a leaf file (its first cert; the rest of the file as untrusted)."""
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cafile), "-untrusted", str(cert), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{cert} does not verify with {cafile}:\n{res.stdout}{res.stderr}"


def _uses_rke2_etcd(daemons: Daemons, servers: list[RKE2Server], rollout: str = "") -> None:
    """rke2certd used RKE2's datastore: `status` names RKE2's embedded etcd on `servers`,
    every daemon's membership (and the rollout's record) is in the stand-in's own etcd. After
    a rotation this also proves a control-plane-only node still finds the etcd members: it
    pins its server's CA by the hash in its RKE2 token, which a new root changes."""
    for node in servers:
        said = str(daemons.status(node.name).get("datastore"))
        assert "etcd" in said and "sqlite" not in said.lower(), (node.name, said)
    keys = rke2_keys(servers[0], PREFIX)
    for name in daemons.by_name:
        assert f"{PREFIX}members/{name}" in keys, (name, sorted(keys))
    if rollout:
        assert any(rollout in k for k in keys), (rollout, sorted(keys))


def _rollouts(daemons: Daemons, via: str) -> list[dict[str, Any]] | None:
    """The CA rollouts `rke2certd status` on `via` shows; None while it cannot say (its
    datastore is RKE2's etcd, down while that node restarts)."""
    res = daemons.cli(via, "status", "-o", "json")
    if res.returncode != 0:
        return None
    rollouts: list[dict[str, Any]] = json.loads(res.stdout)["rollouts"]
    return [r for r in rollouts if r["type"] == "ca"]


def _wait_ca_rollout_done(daemons: Daemons, via: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        for r in _rollouts(daemons, via) or []:
            if r["state"] == "done":
                return r
            assert r["state"] == "active", r
        return None

    try:
        rollout: dict[str, Any] = daemons.service.wait_for(done, ROLLOUT_TIMEOUT, "rollout done")
    except AssertionError:
        tails = "\n".join(f"--- {n}\n{d.tail()}" for n, d in daemons.by_name.items())
        raise AssertionError(f"rollout not done: {_rollouts(daemons, via)}\n{tails}") from None
    return rollout


def _restarts_passed(daemons: Daemons) -> list[Restart]:
    """Every restart passed (the hook, then RKE2's start and reconcile), every hook run on
    every node exited 0, every node is up now, and no daemon logged an error."""
    restarts = daemons.service.restarts()
    failed = [(r.node, r.by, r.error) for r in restarts if not r.ok]
    assert failed == [], failed
    for name, node in daemons.service.nodes.items():
        hooks = [(res.returncode, res.stderr[-500:]) for res in node.hook_runs]
        assert all(rc == 0 for rc, _ in hooks), (name, hooks)
        assert daemons.service.health(name) is None, name
    assert daemons.failures() == {}
    return restarts


def _in_order(restarts: list[Restart], phase: dict[str, str], rollout: str) -> None:
    """The daemons' restarts of `rollout`: each phase's nodes all restarted (and came back)
    before any node of a later phase began, and each with its own phase in its environment."""
    mine = [r for r in restarts if r.by == "daemon" and r.rollout == rollout]
    assert sorted(r.node for r in mine) == sorted(phase), [(r.node, r.rollout) for r in mine]
    for r in mine:
        assert r.phase == phase[r.node], (r.node, r.phase)
    for a in mine:
        for b in mine:
            if PHASE_ORDER[phase[a.node]] < PHASE_ORDER[phase[b.node]]:
                assert a.end < b.seq, f"{a.node} ({phase[a.node]}) after {b.node} began"


def _nothing_for_rke2_to_redo(restarts: list[Restart], rollout: str) -> None:
    """At the daemons' restarts the disk already held what the bootstrap key holds (RKE2's
    reconcile wrote no CA file) and leaves RKE2 accepts (it re-made none)."""
    for r in restarts:
        if r.by == "daemon" and r.rollout == rollout:
            assert r.written == [] and r.certs == {}, (r.node, r.written, r.certs)


def _on_ca(server: RKE2Server, stored: dict[str, tuple[int, bytes]]) -> None:
    for name in bs.CA_FIELDS:
        path = server.server_dir / bs.FIELDS[name]
        assert path.read_bytes() == stored[name][1], (server.name, name)


def _stage_rotation(daemons: Daemons, on: RKE2Server) -> bytes:
    """`rke2certd ca stage-rotation` with its defaults, then the rename its hint says; the new
    server CA bundle (read before the daemon files the set away)."""
    before = set(on.server_dir.joinpath("rotate-ca").iterdir())
    res = daemons.cli(on.name, "ca", "stage-rotation")
    assert res.returncode == 0, res.stderr
    made = [p for p in on.server_dir.joinpath("rotate-ca").iterdir() if p not in before]
    assert len(made) == 1, (made, res.stdout)
    staging = on.server_dir / "rotate-ca" / "incoming"
    assert str(staging) in res.stdout, res.stdout  # the hint: rename it there
    new_server_ca = (made[0] / "tls" / "server-ca.crt").read_bytes()
    made[0].rename(staging / made[0].name)
    return new_server_ca


# -- tests -----------------------------------------------------------------------------------


def test_staged_rotation_rolled_out_in_order_on_etcd_control_plane_and_agent_nodes(
    cluster: Cluster, daemons: Daemons
) -> None:
    e1 = cluster.server(
        "e1",
        token="rollout-secret",
        rke2certd=daemons.config_for("e1"),
        disable_apiserver=True,
        disable_controller_manager=True,
        disable_scheduler=True,
    )
    e1.start()
    c1 = cluster.server("c1", join=e1, disable_etcd=True, rke2certd=daemons.config_for("c1"))
    c1.start()
    a1 = cluster.agent("a1", join=c1, rke2certd=daemons.config_for("a1", agent_of="c1"))
    a1.start()
    for node in (e1, c1, a1):
        daemons.start(node)
    _uses_rke2_etcd(daemons, [e1, c1])
    old_server_ca = (c1.tls / "server-ca.crt").read_bytes()

    new_server_ca = _stage_rotation(daemons, e1)
    rollout = _wait_ca_rollout_done(daemons, "e1")

    restarts = _restarts_passed(daemons)
    _in_order(restarts, {"e1": "etcd", "c1": "control-plane", "a1": "agent"}, rollout["id"])
    _nothing_for_rke2_to_redo(restarts, rollout["id"])
    stored = e1.stored_bootstrap()  # the key RKE2 reconciles against holds the new CAs
    assert stored["ServerCA"][1] == new_server_ca
    for server in (e1, c1):
        _on_ca(server, stored)
        assert _cacerts(server) == new_server_ca, server.name
        # a client that trusts only the old CA still verifies the new serving certs
        _handshake(server.host, server.supervisor_port, old_server_ca)
    _handshake(c1.host, c1.apiserver_port, old_server_ca)
    assert isinstance(a1, RKE2Agent) and a1.running
    assert (a1.agent_dir / "server-ca.crt").read_bytes() == new_server_ca
    assert (a1.agent_dir / "client-ca.crt").read_bytes() == stored["ClientCA"][1]
    for leaf, ca in (
        ("serving-kubelet", "server-ca"),
        ("client-kubelet", "client-ca"),
        ("client-kube-proxy", "client-ca"),
    ):
        _openssl_verify(a1.agent_dir / f"{ca}.crt", a1.agent_dir / f"{leaf}.crt")
    _uses_rke2_etcd(daemons, [e1, c1], rollout["id"])
    for name in ("e1", "c1"):  # a later start has nothing to do: RKE2 writes nothing
        again = daemons.service.restart(name)
        assert again.ok and again.written == [] and again.certs == {}, again


def test_a_restart_out_of_turn_in_the_middle_of_a_rollout(
    cluster: Cluster, daemons: Daemons
) -> None:
    s1 = cluster.server("s1", token="turn-secret", rke2certd=daemons.config_for("s1"))
    s1.start()
    c1 = cluster.server("c1", join=s1, disable_etcd=True, rke2certd=daemons.config_for("c1"))
    c1.start()
    for node in (s1, c1):
        daemons.start(node)
    _uses_rke2_etcd(daemons, [s1, c1])
    old_server_ca = (s1.tls / "server-ca.crt").read_bytes()

    daemons.service.hold("s1")  # s1's turn (etcd phase) is held open
    new_server_ca = _stage_rotation(daemons, s1)
    daemons.service.wait_pending("s1", ROLLOUT_TIMEOUT)
    daemons.wait_event("c1", "rollout_applied", ROLLOUT_TIMEOUT)  # c1 waits for its turn
    by_hand = daemons.service.restart("c1")  # before its turn: hook, then RKE2's reconcile
    assert by_hand.ok, by_hand.error
    daemons.service.release("s1")
    rollout = _wait_ca_rollout_done(daemons, "s1")

    restarts = _restarts_passed(daemons)
    _in_order(restarts, {"s1": "etcd", "c1": "control-plane"}, rollout["id"])
    s1_turn = next(r for r in restarts if r.node == "s1" and r.by == "daemon")
    assert by_hand.end < s1_turn.seq  # c1 restarted while s1 (an earlier phase) had not
    stored = s1.stored_bootstrap()
    assert stored["ServerCA"][1] == new_server_ca
    for server in (s1, c1):
        _on_ca(server, stored)
        _handshake(server.host, server.supervisor_port, old_server_ca)
    _handshake(c1.host, c1.apiserver_port, old_server_ca)
    _uses_rke2_etcd(daemons, [s1, c1], rollout["id"])


@pytest.mark.parametrize("stamped", ["now", "within-3s-of-the-ca"])
def test_upstream_rotate_ca_while_the_daemons_run(
    cluster: Cluster, daemons: Daemons, tmp_path: Path, stamped: str
) -> None:
    """`stamped`: the new files' mtimes (upstream saves them as the Timestamps): now, or 1 s
    after the CA's creation (a rotation that comes within RKE2's 3 s of it, where rke2certd
    once wrote its old CA back)."""
    s1 = cluster.server("s1", token="upstream-secret", rke2certd=daemons.config_for("s1"))
    s1.start()
    c1 = cluster.server("c1", join=s1, disable_etcd=True, rke2certd=daemons.config_for("c1"))
    c1.start()
    for node in (s1, c1):
        daemons.start(node)
    _uses_rke2_etcd(daemons, [s1, c1])
    old_server_ca = (s1.tls / "server-ca.crt").read_bytes()

    cross_signed_set(s1.tls, tmp_path / "rotate-ca" / "tls")
    created = (s1.tls / "server-ca.crt").stat().st_mtime_ns
    if stamped != "now":
        for path in (tmp_path / "rotate-ca" / "tls").rglob("*"):
            if path.is_file():
                os.utime(path, ns=(created + 10**9, created + 10**9))
    before = etcd_revision(s1)
    s1.rotate_ca(tmp_path / "rotate-ca")  # upstream: straight into the bootstrap key
    if stamped != "now":
        assert s1.stored_bootstrap()["ServerCA"][0] - created < 3 * 10**9
    new_server_ca = (tmp_path / "rotate-ca" / "tls" / "server-ca.crt").read_bytes()
    rollout = _wait_ca_rollout_done(daemons, "s1")

    restarts = _restarts_passed(daemons)
    _in_order(restarts, {"s1": "etcd", "c1": "control-plane"}, rollout["id"])
    _nothing_for_rke2_to_redo(restarts, rollout["id"])
    # no daemon ever wrote the old CA back: every value of the key since holds the new one
    history = bootstrap_history(s1, before)
    assert history and all(ca == new_server_ca for rev, ca in history if rev > before), [
        (rev, ca == new_server_ca) for rev, ca in history
    ]
    stored = s1.stored_bootstrap()
    for server in (s1, c1):
        _on_ca(server, stored)
        assert _cacerts(server) == new_server_ca, server.name
        _handshake(server.host, server.supervisor_port, old_server_ca)
    _handshake(c1.host, c1.apiserver_port, old_server_ca)
    _uses_rke2_etcd(daemons, [s1, c1], rollout["id"])
