"""The pure renewal planner, `plan.renewal.decide`: one decision per leaf, edges to the second.

No disk and no clock: certificates are built in memory at fixed instants and `now` is chosen.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from rke2certd.pki import build, certs, keys
from rke2certd.pki.profiles import SERVER_LEAVES, LeafSpec
from rke2certd.plan.renewal import Action, ObservedLeaf, Policy, Wanted, decide, plan

T = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)  # when the CA and the leaf were made
WINDOW = timedelta(days=90)
POLICY = Policy(WINDOW)
SECOND = timedelta(seconds=1)

SPEC: LeafSpec = next(s for s in SERVER_LEAVES if s.name == "serving-kube-apiserver")
SANS = ("kubernetes", "kubernetes.default", "127.0.0.1", "::1", "10.43.0.1")

CA_KEY = keys.new_ec_key()
CA = build.self_signed_ca("rke2-server-ca@1", CA_KEY, T)
LEAF_KEY = keys.new_ec_key()


def make_leaf(
    cn: str = "kube-apiserver",
    orgs: tuple[str, ...] = (),
    sans: tuple[str, ...] = SANS,
    key: keys.PrivateKey = LEAF_KEY,
    ca: x509.Certificate = CA,
    ca_key: keys.PrivateKey = CA_KEY,
) -> x509.Certificate:
    return build.leaf(cn, orgs, "server", sans, key.public_key(), ca, ca_key, T)


LEAF = make_leaf()
NOT_AFTER = LEAF.not_valid_after_utc  # T + 365 d
NOT_BEFORE = LEAF.not_valid_before_utc  # T - 1 h
PUBLIC = keys.public_der(LEAF_KEY)
WANT = Wanted("kube-apiserver", (), SANS, certs.ski(CA))


def observed(
    cert: x509.Certificate | None = LEAF,
    *,
    cert_error: str | None = None,
    chain_current: bool = True,
    key_public: bytes | None = PUBLIC,
    key_error: str | None = None,
) -> ObservedLeaf:
    """What the shell would have read: by default the good leaf and its own key."""
    return ObservedLeaf(SPEC, cert, cert_error, chain_current, key_public, key_error)


def test_fixture_leaf_has_the_lifetime_the_edges_assume() -> None:
    assert T + timedelta(days=365) == NOT_AFTER
    assert T - timedelta(hours=1) == NOT_BEFORE


def test_valid_leaf_outside_the_window_is_kept_with_its_serial_and_expiry() -> None:
    d = decide(observed(), WANT, T, POLICY)
    assert d.action is Action.KEEP and d.reasons == () and not d.new_key
    assert d.old_serial == certs.serial_hex(LEAF) and d.old_not_after == NOT_AFTER


def test_one_second_before_the_window_opens_the_leaf_is_kept() -> None:
    now = NOT_AFTER - WINDOW - SECOND
    assert decide(observed(), WANT, now, POLICY).action is Action.KEEP


def test_exactly_at_the_window_boundary_the_leaf_is_renewed() -> None:
    d = decide(observed(), WANT, NOT_AFTER - WINDOW, POLICY)
    assert d.action is Action.ISSUE
    assert d.reasons == ("expires within 90 days",)
    assert not d.new_key, "a valid key is kept"


def test_one_second_inside_the_window_the_leaf_is_renewed() -> None:
    d = decide(observed(), WANT, NOT_AFTER - WINDOW + SECOND, POLICY)
    assert d.action is Action.ISSUE and d.reasons == ("expires within 90 days",)


def test_the_window_follows_the_policy() -> None:
    now = NOT_AFTER - timedelta(days=30)
    assert decide(observed(), WANT, now, Policy(timedelta(days=29))).action is Action.KEEP
    assert decide(observed(), WANT, now, Policy(timedelta(days=30))).action is Action.ISSUE


def test_at_the_expiry_instant_the_leaf_is_still_valid_but_inside_the_window() -> None:
    d = decide(observed(), WANT, NOT_AFTER, POLICY)
    assert d.reasons == ("expires within 90 days",)


def test_expired_by_one_second_the_leaf_is_renewed_as_expired() -> None:
    d = decide(observed(), WANT, NOT_AFTER + SECOND, POLICY)
    assert d.action is Action.ISSUE
    assert d.reasons == ("expired",)
    assert d.old_not_after == NOT_AFTER
    assert not d.new_key


def test_one_second_before_not_before_the_leaf_is_not_yet_valid_and_renewed() -> None:
    d = decide(observed(), WANT, NOT_BEFORE - SECOND, POLICY)
    assert d.action is Action.ISSUE
    assert d.reasons == ("not yet valid",)


def test_at_not_before_the_leaf_is_valid_and_kept() -> None:
    assert decide(observed(), WANT, NOT_BEFORE, POLICY).action is Action.KEEP


def test_missing_cert_and_key_are_issued_with_a_new_key() -> None:
    d = decide(observed(None, key_public=None), WANT, T, POLICY)
    assert d.action is Action.ISSUE and d.new_key
    assert d.reasons == ("missing", "key missing")
    assert d.old_serial is None and d.old_not_after is None


def test_missing_cert_with_a_good_key_keeps_the_key() -> None:
    d = decide(observed(None), WANT, T, POLICY)
    assert d.action is Action.ISSUE and not d.new_key and d.reasons == ("missing",)


def test_unreadable_cert_is_reissued_and_says_why() -> None:
    d = decide(observed(None, cert_error="x.crt: not a PEM file"), WANT, T, POLICY)
    assert d.action is Action.ISSUE and not d.new_key
    assert d.reasons == ("unreadable (x.crt: not a PEM file)",)


def test_unreadable_key_gets_a_new_key() -> None:
    d = decide(observed(key_public=None, key_error="x.key: garbage"), WANT, T, POLICY)
    assert d.action is Action.ISSUE and d.new_key
    assert d.reasons == ("key unreadable (x.key: garbage)",)


def test_key_that_does_not_match_the_cert_gets_the_cert_reissued_for_that_key() -> None:
    other = keys.public_der(keys.new_ec_key())
    d = decide(observed(key_public=other), WANT, T, POLICY)
    assert d.action is Action.ISSUE and not d.new_key
    assert d.reasons == ("key does not match certificate",)


def test_changed_cn_is_renewed_and_names_old_and_new() -> None:
    d = decide(observed(), Wanted("kube-apiserver-2", (), SANS, WANT.ca_ski), T, POLICY)
    assert d.reasons == ("CN changed ('kube-apiserver' -> 'kube-apiserver-2')",)


def test_changed_organization_is_renewed() -> None:
    d = decide(
        observed(), Wanted("kube-apiserver", ("system:masters",), SANS, WANT.ca_ski), T, POLICY
    )
    assert d.reasons == ("O changed",)


def test_missing_san_is_renewed_and_named() -> None:
    want = Wanted("kube-apiserver", (), (*SANS, "new.example.test", "198.51.100.1"), WANT.ca_ski)
    d = decide(observed(), want, T, POLICY)
    assert d.reasons == ("SAN missing: new.example.test, 198.51.100.1",)


def test_extra_san_in_the_cert_is_not_a_reason_to_renew() -> None:
    want = Wanted("kube-apiserver", (), SANS[:2], WANT.ca_ski)
    assert decide(observed(), want, T, POLICY).action is Action.KEEP


def test_ip_sans_compare_by_value_not_by_spelling() -> None:
    want = Wanted("kube-apiserver", (), ("0:0:0:0:0:0:0:1", "127.0.0.1"), WANT.ca_ski)
    assert decide(observed(), want, T, POLICY).action is Action.KEEP


def test_a_dns_name_does_not_satisfy_an_ip_san() -> None:
    leaf = make_leaf(sans=("10.43.0.1.example",))
    want = Wanted("kube-apiserver", (), ("10.43.0.1",), WANT.ca_ski)
    assert decide(observed(leaf), want, T, POLICY).reasons == ("SAN missing: 10.43.0.1",)


def test_leaf_signed_by_another_ca_is_renewed() -> None:
    new_ca = build.self_signed_ca("rke2-server-ca@2", keys.new_ec_key(), T)
    d = decide(observed(), Wanted("kube-apiserver", (), SANS, certs.ski(new_ca)), T, POLICY)
    assert d.reasons == ("signed by another CA (AKI does not match the CA's SKI)",)
    assert not d.new_key


def test_stale_chain_only_rechains_the_same_certificate() -> None:
    d = decide(observed(chain_current=False), WANT, T, POLICY)
    assert d.action is Action.RECHAIN and not d.new_key
    assert d.reasons == ("CA chain changed",)


def test_a_reason_to_reissue_wins_over_a_rechain() -> None:
    d = decide(observed(chain_current=False), WANT, NOT_AFTER + SECOND, POLICY)
    assert d.action is Action.ISSUE and d.reasons == ("expired",)


def test_every_problem_is_listed_at_once() -> None:
    other = keys.public_der(keys.new_ec_key())
    want = Wanted("other", ("o",), (*SANS, "x.test"), b"\x00" * 20)
    d = decide(observed(key_public=other), want, NOT_AFTER + SECOND, POLICY)
    assert d.reasons == (
        "key does not match certificate",
        "expired",
        "CN changed ('kube-apiserver' -> 'other')",
        "O changed",
        "SAN missing: x.test",
        "signed by another CA (AKI does not match the CA's SKI)",
    )


def test_forced_rotation_gets_a_new_key_even_for_a_perfect_leaf() -> None:
    d = decide(observed(), WANT, T, Policy(WINDOW, frozenset({SPEC.name})))
    assert d.action is Action.ISSUE and d.new_key
    assert d.reasons == ("rotation requested",)
    assert d.old_serial == certs.serial_hex(LEAF)


def test_forcing_another_leaf_does_not_touch_this_one() -> None:
    d = decide(observed(), WANT, T, Policy(WINDOW, frozenset({"client-admin"})))
    assert d.action is Action.KEEP


@pytest.mark.parametrize("offset", [-SECOND, timedelta(0), SECOND])
def test_plan_decides_each_leaf_on_its_own(offset: timedelta) -> None:
    now = NOT_AFTER - WINDOW + offset
    fresh = build.leaf(
        "kube-apiserver",
        (),
        "server",
        SANS,
        LEAF_KEY.public_key(),
        CA,
        CA_KEY,
        T + timedelta(days=100),
    )
    decisions = plan([(observed(), WANT), (observed(fresh), WANT)], now, POLICY)
    expected_first = Action.KEEP if offset < timedelta(0) else Action.ISSUE
    assert [d.action for d in decisions] == [expected_first, Action.KEEP]
