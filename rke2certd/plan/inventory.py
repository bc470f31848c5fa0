"""PURE: `certificate check` rows, one per certificate of a file (docs/RKE2-COMPATIBILITY.md §5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path


class Status(StrEnum):
    OK = "OK"
    WARNING = "WARNING"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT YET VALID"
    CHAIN_BROKEN = "CHAIN BROKEN"  # the leaf does not verify against its CA file


@dataclass(frozen=True)
class CertFacts:
    """What a row says about one certificate, read once from its bytes (node/cert_facts.py)."""

    subject: str  # CN
    issuer: str  # CN
    usages: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: str  # hex


@dataclass(frozen=True)
class Row:
    path: Path
    service: str
    index: int  # position in the file: 0 = the leaf, then its chain
    subject: str
    issuer: str
    usages: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: str
    status: Status
    residual: timedelta
    chain: str = ""  # on the leaf row: why its chain does not verify, else empty
    # a kubeconfig's certificate: `user` and the YAML key it came from (x509-certificate-
    # exporter's embedded_kind / embedded_key); empty for PEM files
    embedded_kind: str = ""
    embedded_key: str = ""

    @property
    def expiry(self) -> datetime:
        """Upstream shows NotBefore as the 'expiry' of a not-yet-valid cert."""
        return self.not_before if self.status is Status.NOT_YET_VALID else self.not_after


def status(facts: CertFacts, now: datetime, window: timedelta) -> Status:
    if now < facts.not_before:
        return Status.NOT_YET_VALID
    if now > facts.not_after:
        return Status.EXPIRED
    if facts.not_after - now <= window:
        return Status.WARNING
    return Status.OK


def rows_for(
    path: Path,
    service: str,
    bundle: Sequence[CertFacts],
    now: datetime,
    window: timedelta,
    chain: str = "",
) -> list[Row]:
    """The rows of one file: `bundle` holds the facts of its certificates, in file order;
    `chain` says why the leaf (the first) does not verify against its CA file, if it does not.
    An expired or not yet valid leaf keeps that status; otherwise a broken chain is its status."""
    rows = [
        Row(
            path=path,
            service=service,
            index=i,
            subject=f.subject,
            issuer=f.issuer,
            usages=f.usages,
            not_before=f.not_before,
            not_after=f.not_after,
            serial=f.serial,
            status=status(f, now, window),
            residual=f.not_after - now,
        )
        for i, f in enumerate(bundle)
    ]
    if chain and rows:
        leaf = rows[0]
        broken = leaf.status in (Status.OK, Status.WARNING)
        rows[0] = replace(leaf, chain=chain, status=Status.CHAIN_BROKEN if broken else leaf.status)
    return rows


def failing(rows: Sequence[Row]) -> bool:
    """`check` exits non-zero when any certificate is expired or not yet valid, or a leaf's
    chain does not verify."""
    return any(
        r.status in (Status.EXPIRED, Status.NOT_YET_VALID, Status.CHAIN_BROKEN) or r.chain
        for r in rows
    )
