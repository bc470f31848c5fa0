"""PURE: the node's certificates in one word, as monitoring plugins say it.

`certificate check --exit-codes=nagios` and `status --exit-codes=nagios` exit with the level's
code; the daemon logs `all_certificates_ok` when the level goes back to OK and exports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from rke2certd.plan.inventory import Row, Status
from rke2certd.plan.kubeconfigs import KubeconfigEntry

CRITICAL = (Status.EXPIRED, Status.NOT_YET_VALID, Status.CHAIN_BROKEN)


class Level(IntEnum):
    """Monitoring-plugin exit codes (Nagios, Icinga, Sensu, check_mk)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Verdict:
    level: Level
    text: str  # one line: what is wrong first


def verdict(
    rows: Sequence[Row],
    errors: Sequence[str],
    warnings: Sequence[str] = (),
    kubeconfigs: Sequence[KubeconfigEntry] = (),
) -> Verdict:
    """CRITICAL: a certificate expired, not yet valid or with a broken chain, or a kubeconfig's
    client cert is (or was issued by another CA than the current one); UNKNOWN: a file could
    not be read (or none at all; a kubeconfig naming a missing file is one); WARNING: inside
    the renewal window, a stale copy (`warnings`), a kubeconfig whose cert or CA is not the
    current one."""
    bad = [r for r in rows if r.status in CRITICAL]
    soon = [r for r in rows if r.status is Status.WARNING]
    bad_kc = [k for k in kubeconfigs if k.critical]
    if bad or bad_kc:
        parts = []
        if bad:
            names = ", ".join(sorted({str(r.path) for r in bad}))
            parts.append(
                f"{len(bad)} certificate(s) expired, not yet valid or with a broken chain: {names}"
            )
        if bad_kc:
            names = ", ".join(sorted({k.path for k in bad_kc}))
            parts.append(f"{len(bad_kc)} kubeconfig(s) with an unusable client cert: {names}")
        return Verdict(Level.CRITICAL, "; ".join(parts))
    if errors:
        return Verdict(Level.UNKNOWN, f"{len(errors)} file(s) unreadable: {errors[0]}")
    if not rows:
        return Verdict(Level.UNKNOWN, "no certificates found")
    stale_kc = [k for k in kubeconfigs if k.warning]
    if soon or warnings or stale_kc:
        parts = []
        if soon:
            first = min(soon, key=lambda r: r.not_after)
            parts.append(
                f"{len(soon)} certificate(s) inside the renewal window, first {first.path} on "
                f"{first.not_after.strftime('%Y-%m-%d %H:%M')} UTC"
            )
        parts += warnings
        parts += [f"{k.path}: {k.problem}" for k in stale_kc]
        return Verdict(Level.WARNING, "; ".join(parts))
    first = min(rows, key=lambda r: r.not_after)
    return Verdict(
        Level.OK,
        f"all {len(rows)} certificates valid and outside the renewal window; next expiry "
        f"{first.path.name} on {first.not_after.strftime('%Y-%m-%d %H:%M')} UTC",
    )
