"""PURE: the rows of `certificate check` (RKE2-PKI.md §4), one per certificate in each file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from rke2certd.pki import certs


class Status(StrEnum):
    OK = "OK"
    WARNING = "WARNING"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT YET VALID"


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

    @property
    def expiry(self) -> datetime:
        """Upstream shows NotBefore as the 'expiry' of a not-yet-valid cert."""
        return self.not_before if self.status is Status.NOT_YET_VALID else self.not_after


def status(cert: x509.Certificate, now: datetime, window: timedelta) -> Status:
    if now < certs.not_before(cert):
        return Status.NOT_YET_VALID
    if now > certs.not_after(cert):
        return Status.EXPIRED
    if certs.not_after(cert) - now <= window:
        return Status.WARNING
    return Status.OK


def rows_for(
    path: Path, service: str, bundle: Sequence[x509.Certificate], now: datetime, window: timedelta
) -> list[Row]:
    return [
        Row(
            path=path,
            service=service,
            index=i,
            subject=certs.common_name(c.subject),
            issuer=certs.common_name(c.issuer),
            usages=tuple(certs.usages(c)),
            not_before=certs.not_before(c),
            not_after=certs.not_after(c),
            serial=certs.serial_hex(c),
            status=status(c, now, window),
            residual=certs.not_after(c) - now,
        )
        for i, c in enumerate(bundle)
    ]


def failing(rows: Sequence[Row]) -> bool:
    """`check` exits non-zero when any certificate is expired or not yet valid."""
    return any(r.status in (Status.EXPIRED, Status.NOT_YET_VALID) for r in rows)
