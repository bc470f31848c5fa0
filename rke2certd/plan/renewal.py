"""PURE: which leaves to (re)issue and why. No clock, no disk: inputs in, a plan out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509

from rke2certd.pki import certs
from rke2certd.pki.profiles import LeafSpec


class Action(StrEnum):
    KEEP = "keep"
    ISSUE = "issue"  # sign a new certificate (new key when `new_key`)
    RECHAIN = "rechain"  # same certificate, the CA chain appended to it changed


@dataclass(frozen=True)
class ObservedLeaf:
    """What the shell read for one leaf. Errors are text: a bad leaf is re-issued, not fatal."""

    spec: LeafSpec
    cert: x509.Certificate | None = None
    cert_error: str | None = None
    chain_current: bool = True  # the file's appended chain equals the CA file
    key_public: bytes | None = None  # SubjectPublicKeyInfo DER of the key file
    key_error: str | None = None


@dataclass(frozen=True)
class Wanted:
    """What the leaf should say, computed from config by the shell."""

    cn: str
    orgs: tuple[str, ...]
    sans: tuple[str, ...]
    ca_ski: bytes | None


@dataclass(frozen=True)
class Decision:
    spec: LeafSpec
    action: Action
    new_key: bool = False
    reasons: tuple[str, ...] = ()
    old_serial: str | None = None
    old_not_after: datetime | None = None


@dataclass(frozen=True)
class Policy:
    renew_before: timedelta
    force: frozenset[str] = field(default_factory=frozenset)  # leaf names to rotate (new key)


def _missing_sans(cert: x509.Certificate, wanted: Sequence[str]) -> list[str]:
    dns, ips = certs.sans(cert)
    missing = []
    for value in wanted:
        kind, canon = certs.parse_san(value)
        if canon not in (ips if kind == "ip" else dns):
            missing.append(value)
    return missing


def decide(obs: ObservedLeaf, want: Wanted, now: datetime, policy: Policy) -> Decision:
    """The decision for one leaf; reasons name every problem found."""
    spec = obs.spec
    if spec.name in policy.force:
        return Decision(spec, Action.ISSUE, True, ("rotation requested",), *_old(obs.cert))
    key_ok = obs.key_public is not None
    key_reason = "key missing" if obs.key_error is None else f"key unreadable ({obs.key_error})"
    if obs.cert is None:
        reason = "missing" if obs.cert_error is None else f"unreadable ({obs.cert_error})"
        first = (reason,) if key_ok else (reason, key_reason)
        return Decision(spec, Action.ISSUE, not key_ok, first)
    cert = obs.cert
    reasons: list[str] = []
    if not key_ok:
        reasons.append(key_reason)
    elif not certs.key_matches(cert, obs.key_public or b""):
        reasons.append("key does not match certificate")
    not_after = certs.not_after(cert)
    if now > not_after:
        reasons.append("expired")
    elif not_after - now <= policy.renew_before:
        days = policy.renew_before.days
        reasons.append(f"expires within {days} days")
    if now < certs.not_before(cert):
        reasons.append("not yet valid")
    if certs.common_name(cert.subject) != want.cn:
        reasons.append(f"CN changed ({certs.common_name(cert.subject)!r} -> {want.cn!r})")
    if certs.organizations(cert.subject) != want.orgs:
        reasons.append("O changed")
    missing = _missing_sans(cert, want.sans)
    if missing:
        reasons.append("SAN missing: " + ", ".join(missing))
    if want.ca_ski is not None and certs.aki(cert) != want.ca_ski:
        reasons.append("signed by another CA (AKI does not match the CA's SKI)")
    if reasons:
        return Decision(spec, Action.ISSUE, not key_ok, tuple(reasons), *_old(cert))
    if not obs.chain_current:
        return Decision(spec, Action.RECHAIN, False, ("CA chain changed",), *_old(cert))
    return Decision(spec, Action.KEEP, False, (), *_old(cert))


def _old(cert: x509.Certificate | None) -> tuple[str | None, datetime | None]:
    if cert is None:
        return None, None
    return certs.serial_hex(cert), certs.not_after(cert)


def plan(
    observed: Sequence[tuple[ObservedLeaf, Wanted]], now: datetime, policy: Policy
) -> list[Decision]:
    return [decide(obs, want, now, policy) for obs, want in observed]
