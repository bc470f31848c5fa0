"""Startup renewal with an injected clock: each reason to renew touches exactly the files it must.

A live node has two-year-old CAs and leaves issued at the clock's time. A leaf is "aged" by
re-issuing it in-process at an earlier `now`, so it expires soon relative to the test's `now`.
After each renewal, a snapshot (bytes + mtime_ns + mode of every file) proves that every other
file is untouched.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from rke2certd.pki import build, certs, keys
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import LeafSpec
from tests.conftest import FrozenClock, run_cli

from .conftest import LiveNode
from .helpers import (
    assert_node_complete,
    changed,
    key_rel,
    leaf_rel,
    load_cert,
    public_der_of_key,
    rel,
    renew_at,
    snapshot,
    spec_named,
    specs_of,
)

APISERVER = spec_named("serving-kube-apiserver")
ADMIN = spec_named("client-admin")
ETCD_SERVER = spec_named("etcd/server-client")
ETCD_PEER = spec_named("etcd/peer-server-client")
KUBELET_CLIENT = spec_named("client-kubelet", agent=True)
KUBELET_SERVING = spec_named("serving-kubelet", agent=True)


def age(live: LiveNode, spec: LeafSpec, issued: datetime) -> None:
    """Re-issue one leaf as if it had been issued at `issued` (same key)."""
    spec.cert_path(live.node.layout).unlink()
    res = renew_at(live.node, issued, specs=(spec,))
    assert [c.path for c in res.changes] == [spec.cert_path(live.node.layout)]


def set_config(live: LiveNode, **changes: object) -> None:
    doc = yaml.safe_load(live.cfg.read_text())
    doc.update({k.replace("_", "-"): v for k, v in changes.items()})
    live.cfg.write_text(yaml.safe_dump(doc))
    live.reload()


def crts(live: LiveNode, *specs: LeafSpec) -> set[str]:
    return {leaf_rel(live.node, s) for s in specs}


# -- one reason each --------------------------------------------------------------------------


def test_leaf_inside_the_window_is_renewed_with_its_key_and_nothing_else_changes(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    age(live_node, APISERVER, clock.at(days=-300))  # expires in 65 days: inside the 90-day window
    layout = live_node.node.layout
    old = load_cert(APISERVER.cert_path(layout))
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(live_node, APISERVER)
    [change] = res.changes
    assert change.reasons == ("expires within 90 days",) and not change.new_key
    assert change.old_serial == certs.serial_hex(old)
    new = load_cert(APISERVER.cert_path(layout))
    assert new.not_valid_after_utc == clock.at(days=365)
    assert new.public_key() == old.public_key(), "the valid key is kept"
    assert change.new_serial == certs.serial_hex(new) != change.old_serial
    assert_node_complete(live_node.node, clock())


def test_leaf_one_day_outside_the_window_is_not_renewed(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    age(live_node, APISERVER, clock.at(days=-274))  # expires in 91 days
    before = snapshot(live_node.data)
    assert renew_at(live_node.node, clock()).changes == []
    assert changed(before, snapshot(live_node.data)) == set()


def test_expired_leaf_is_renewed_and_nothing_else_changes(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    age(live_node, ADMIN, clock.at(days=-366))  # expired yesterday
    key_before = public_der_of_key(ADMIN.key_path(live_node.node.layout))
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(live_node, ADMIN)
    assert [c.reasons for c in res.changes] == [("expired",)]
    assert public_der_of_key(ADMIN.key_path(live_node.node.layout)) == key_before
    assert_node_complete(live_node.node, clock())


def test_moving_the_clock_into_every_window_renews_every_leaf_and_no_ca(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    cas_before = {p: p.read_bytes() for p in layout.ca_files()}
    keys_before = {s.name: public_der_of_key(s.key_path(layout)) for s in specs_of(live_node.node)}
    later = clock.advance(days=300)

    res = renew_at(live_node.node, later)

    assert len(res.changes) == len(specs_of(live_node.node))
    assert {c.reasons for c in res.changes} == {("expires within 90 days",)}
    assert {p: p.read_bytes() for p in layout.ca_files()} == cas_before, "CAs are never renewed"
    assert {
        s.name: public_der_of_key(s.key_path(layout)) for s in specs_of(live_node.node)
    } == keys_before
    assert_node_complete(live_node.node, later)


def test_changed_node_name_reissues_exactly_the_certs_that_carry_it(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    set_config(live_node, node_name="node-z")
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    # The kubelet certs carry it as CN; the server certs as a SAN.
    expected = crts(live_node, KUBELET_CLIENT, KUBELET_SERVING, APISERVER, ETCD_SERVER, ETCD_PEER)
    assert changed(before, snapshot(live_node.data)) == expected
    reasons = {rel(live_node.node, c.path): c.reasons for c in res.changes}
    assert reasons[leaf_rel(live_node.node, KUBELET_CLIENT)] == (
        "CN changed ('system:node:node-a' -> 'system:node:node-z')",
    )
    assert reasons[leaf_rel(live_node.node, APISERVER)] == ("SAN missing: node-z",)
    assert not any(c.new_key for c in res.changes)
    assert_node_complete(live_node.node, clock())


def test_added_tls_san_reissues_exactly_the_server_certs(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    set_config(
        live_node, tls_san=["rke2.example.test", "203.0.113.7", "lb.example.test", "198.51.100.9"]
    )
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(
        live_node, APISERVER, ETCD_SERVER, ETCD_PEER
    )
    assert {c.reasons for c in res.changes} == {("SAN missing: lb.example.test, 198.51.100.9",)}
    dns, ips = certs.sans(load_cert(APISERVER.cert_path(live_node.node.layout)))
    assert "lb.example.test" in dns and "198.51.100.9" in ips
    assert_node_complete(live_node.node, clock())


def test_replaced_ca_reissues_only_its_leaves_and_derived_files(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    new_key = keys.new_ec_key()
    new_ca = build.self_signed_ca("rke2-server-ca@2", new_key, clock.at(days=-1))
    layout.ca_cert("server-ca").write_bytes(certs.bundle_pem([new_ca]))
    layout.ca_key("server-ca").write_bytes(keys.key_to_pem(new_key))
    signed_by_server_ca = [s for s in specs_of(live_node.node) if s.signer == "server-ca"]
    assert len(signed_by_server_ca) == 4
    keys_before = {s.name: public_der_of_key(s.key_path(layout)) for s in signed_by_server_ca}
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    derived = {
        rel(live_node.node, layout.nochain("server-ca")),
        rel(live_node.node, layout.agent_server_ca),
    }
    assert (
        changed(before, snapshot(live_node.data)) == crts(live_node, *signed_by_server_ca) | derived
    )
    assert {c.reasons for c in res.changes} == {
        ("signed by another CA (AKI does not match the CA's SKI)",)
    }
    for spec in signed_by_server_ca:
        leaf = load_cert(spec.cert_path(layout))
        leaf.verify_directly_issued_by(new_ca)
        assert public_der_of_key(spec.key_path(layout)) == keys_before[spec.name]
    assert_node_complete(live_node.node, clock())


def test_key_replaced_by_another_key_gets_a_cert_for_that_key(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    replacement = keys.key_to_pem(keys.new_ec_key())
    ADMIN.key_path(layout).write_bytes(replacement)
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(live_node, ADMIN)
    assert [c.reasons for c in res.changes] == [("key does not match certificate",)]
    assert ADMIN.key_path(layout).read_bytes() == replacement
    assert_node_complete(live_node.node, clock())


def test_missing_key_gets_a_new_key_and_cert(live_node: LiveNode, clock: FrozenClock) -> None:
    layout = live_node.node.layout
    old_public = load_cert(ADMIN.cert_path(layout)).public_key()
    ADMIN.key_path(layout).unlink()
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(live_node, ADMIN) | {
        key_rel(live_node.node, ADMIN)
    }
    assert res.changes[0].new_key and res.changes[0].reasons == ("key missing",)
    assert load_cert(ADMIN.cert_path(layout)).public_key() != old_public
    assert ADMIN.key_path(layout).stat().st_mode & 0o777 == 0o600
    assert_node_complete(live_node.node, clock())


def test_missing_cert_is_reissued_for_the_existing_key(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    key_pem = KUBELET_SERVING.key_path(layout).read_bytes()
    KUBELET_SERVING.cert_path(layout).unlink()
    before = snapshot(live_node.data)

    renew_at(live_node.node, clock())

    assert changed(before, snapshot(live_node.data)) == crts(live_node, KUBELET_SERVING)
    assert KUBELET_SERVING.key_path(layout).read_bytes() == key_pem
    assert_node_complete(live_node.node, clock())


def test_ca_bundle_that_grew_rechains_its_leaves_without_new_certificates(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    client_leaves = [s for s in specs_of(live_node.node) if s.signer == "client-ca"]
    serials_before = {s.name: load_cert(s.cert_path(layout)).serial_number for s in client_leaves}
    extra = build.self_signed_ca("old-client-ca", keys.new_ec_key(), clock.at(days=-1000))
    bundle = layout.ca_cert("client-ca")
    bundle.write_bytes(bundle.read_bytes() + certs.bundle_pem([extra]))
    before = snapshot(live_node.data)

    res = renew_at(live_node.node, clock())

    derived = {rel(live_node.node, layout.agent_client_ca)}  # the nochain file keeps the first cert
    assert changed(before, snapshot(live_node.data)) == crts(live_node, *client_leaves) | derived
    assert {c.action for c in res.changes} == {"rechain"}
    assert {
        s.name: load_cert(s.cert_path(layout)).serial_number for s in client_leaves
    } == serials_before
    assert_node_complete(live_node.node, clock())


# -- nothing to do ----------------------------------------------------------------------------


def test_second_run_with_nothing_to_do_changes_no_byte_and_no_mtime(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    before = snapshot(live_node.data)
    res = renew_at(live_node.node, clock.advance(days=1))
    assert res.changes == [] and res.derived == [] and not res.created_cas
    assert changed(before, snapshot(live_node.data)) == set()


def test_cli_second_run_changes_no_byte_and_no_mtime(live_node: LiveNode) -> None:
    first = run_cli("-c", live_node.cfg, "renew")
    assert first.returncode == 0, first.stderr
    before = snapshot(live_node.data)
    second = run_cli("-c", live_node.cfg, "renew")
    assert second.returncode == 0, second.stderr
    assert second.stdout == "all certificates are valid; nothing to do\n"
    assert changed(before, snapshot(live_node.data)) == set()


# -- dry run, JSON output, log events (through the CLI) --------------------------------------


@pytest.fixture
def aged_cli_node(live_node: LiveNode, clock: FrozenClock) -> LiveNode:
    """A live node the CLI has already run on once, with three leaves to renew."""
    res = run_cli("-c", live_node.cfg, "renew")
    assert res.returncode == 0, res.stderr
    age(live_node, APISERVER, clock.at(days=-300))
    age(live_node, ADMIN, clock.at(days=-366))
    KUBELET_SERVING.cert_path(live_node.node.layout).unlink()
    return live_node


def test_dry_run_prints_the_plan_and_writes_nothing(aged_cli_node: LiveNode) -> None:
    # The embedded datastore's database (server/db/) is left out of the snapshot: it belongs to
    # the datastore module, whose dry-run behaviour is not this suite's subject.
    node = aged_cli_node.node
    before = snapshot(aged_cli_node.data)
    res = run_cli("-c", aged_cli_node.cfg, "renew", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert changed(before, snapshot(aged_cli_node.data)) == set()
    lines = res.stdout.splitlines()
    assert f"would issue {APISERVER.cert_path(node.layout)}: expires within 90 days" in lines
    assert f"would issue {ADMIN.cert_path(node.layout)}: expired" in lines
    assert f"would issue {KUBELET_SERVING.cert_path(node.layout)}: missing" in lines
    assert len([ln for ln in lines if ln.startswith("would issue")]) == 3


def test_dry_run_json_lists_the_changes_without_new_serials(aged_cli_node: LiveNode) -> None:
    before = snapshot(aged_cli_node.data)
    res = run_cli("-c", aged_cli_node.cfg, "renew", "--dry-run", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dryRun"] is True
    by_path = {c["path"]: c for c in doc["changes"]}
    layout = aged_cli_node.node.layout
    assert set(by_path) == {str(s.cert_path(layout)) for s in (APISERVER, ADMIN, KUBELET_SERVING)}
    assert by_path[str(ADMIN.cert_path(layout))]["reasons"] == ["expired"]
    assert all(c["newSerial"] is None for c in doc["changes"])
    assert changed(before, snapshot(aged_cli_node.data)) == set()


def test_json_output_reports_each_renewal_with_old_and_new_serial_and_expiry(
    aged_cli_node: LiveNode,
) -> None:
    layout = aged_cli_node.node.layout
    old_admin = load_cert(ADMIN.cert_path(layout))
    res = run_cli("-c", aged_cli_node.cfg, "renew", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "RenewResult" and doc["dryRun"] is False
    by_path = {c["path"]: c for c in doc["changes"]}
    admin = by_path[str(ADMIN.cert_path(layout))]
    new_admin = load_cert(ADMIN.cert_path(layout))
    assert admin["oldSerial"] == certs.serial_hex(old_admin)
    assert admin["newSerial"] == certs.serial_hex(new_admin)
    assert datetime.fromisoformat(admin["oldNotAfter"]) == old_admin.not_valid_after_utc
    assert datetime.fromisoformat(admin["newNotAfter"]) == new_admin.not_valid_after_utc
    assert doc["restart"] == ["rke2-server"]
    assert_node_complete(aged_cli_node.node)


def test_each_renewed_file_logs_one_cert_renewed_event_with_old_and_new_facts(
    aged_cli_node: LiveNode,
) -> None:
    layout = aged_cli_node.node.layout
    renewed = (APISERVER, ADMIN, KUBELET_SERVING)
    old = {s: load_cert(s.cert_path(layout)) for s in renewed if s.cert_path(layout).exists()}
    res = run_cli("-c", aged_cli_node.cfg, "renew", "--log-format", "json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    renewals = [e for e in events if e["event"] == "cert_renewed"]
    assert sorted(e["cert_path"] for e in renewals) == sorted(
        str(s.cert_path(layout)) for s in renewed
    )
    for spec in renewed:
        [event] = [e for e in renewals if e["cert_path"] == str(spec.cert_path(layout))]
        new = load_cert(spec.cert_path(layout))
        assert event["cert_serial"] == certs.serial_hex(new)
        assert datetime.fromisoformat(event["cert_not_after"]) == new.not_valid_after_utc
        if spec in old:
            assert event["old_serial"] == certs.serial_hex(old[spec])
            assert datetime.fromisoformat(event["old_not_after"]) == old[spec].not_valid_after_utc
        else:
            assert event["old_serial"] is None and event["old_not_after"] is None
    reasons = {e["cert_path"]: e["reason"] for e in renewals}
    assert reasons[str(ADMIN.cert_path(layout))] == "expired"
    assert reasons[str(APISERVER.cert_path(layout))] == "expires within 90 days"
    assert reasons[str(KUBELET_SERVING.cert_path(layout))] == "missing"
    assert all(e["level"] == "info" and "timestamp" in e for e in renewals)
    assert "PRIVATE KEY" not in res.stderr


def test_renewed_leaf_keeps_the_ec_key_type_and_mode(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    age(live_node, ETCD_PEER, clock.at(days=-300))
    renew_at(live_node.node, clock())
    layout: Layout = live_node.node.layout
    assert isinstance(
        load_cert(ETCD_PEER.cert_path(layout)).public_key(), ec.EllipticCurvePublicKey
    )
    assert ETCD_PEER.cert_path(layout).stat().st_mode & 0o777 == 0o644
    assert ETCD_PEER.key_path(layout).stat().st_mode & 0o777 == 0o600
    assert load_cert(ETCD_PEER.cert_path(layout)).not_valid_before_utc == clock.at(hours=-1)
    assert (
        timedelta(days=365) == load_cert(ETCD_PEER.cert_path(layout)).not_valid_after_utc - clock()
    )
