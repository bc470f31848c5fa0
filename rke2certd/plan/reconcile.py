"""PURE: the datastore's bootstrap data vs the files on disk (docs/RKE2-COMPATIBILITY.md §6).

The datastore wins, except where a file on disk is different AND at least 3 s newer than the
stored Timestamp: then start-up stops, because someone changed a CA file by hand and
overwriting it could lose the only copy of a new key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

NEWER_SLACK = timedelta(seconds=3)
_NEWER_SLACK_NS = NEWER_SLACK // timedelta(microseconds=1) * 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_unix_ns(unix_ns: int) -> datetime:
    """A Unix time in nanoseconds as an aware datetime (microseconds: for messages only)."""
    return _EPOCH + timedelta(microseconds=unix_ns // 1000)


@dataclass(frozen=True)
class DiskFile:
    data: bytes
    mtime_ns: int  # the file's st_mtime_ns: compared at full precision


@dataclass(frozen=True)
class Stored:
    content: bytes
    timestamp_ns: int  # the stored Timestamp as Unix nanoseconds (Go keeps nanoseconds)


@dataclass(frozen=True)
class Conflict:
    field: str
    path: str
    disk_mtime: datetime
    stored_timestamp: datetime


@dataclass
class ReconcilePlan:
    writes: dict[str, bytes] = field(default_factory=dict)  # field -> content to write
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    full_restore: bool = False


def reconcile(
    stored: Mapping[str, Stored],
    disk: Mapping[str, DiskFile | None],
    paths: Mapping[str, str],
    tls_empty: bool,
) -> ReconcilePlan:
    """What to write to disk from the stored data; `paths` maps field -> file (for messages)."""
    plan = ReconcilePlan(full_restore=tls_empty)
    for name, entry in sorted(stored.items()):
        if not entry.content:
            continue  # an empty field is "not set" upstream: nothing to write
        current = disk.get(name)
        if tls_empty or current is None:
            plan.writes[name] = entry.content
        elif current.data == entry.content:
            plan.unchanged.append(name)
        elif current.mtime_ns - entry.timestamp_ns >= _NEWER_SLACK_NS:
            plan.conflicts.append(
                Conflict(
                    name,
                    paths.get(name, name),
                    from_unix_ns(current.mtime_ns),
                    from_unix_ns(entry.timestamp_ns),
                )
            )
        else:
            plan.writes[name] = entry.content
    return plan
