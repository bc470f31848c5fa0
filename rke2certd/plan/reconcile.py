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
_NEWER_SLACK_S = int(NEWER_SLACK.total_seconds())
_NS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_unix_ns(unix_ns: int) -> datetime:
    """A Unix time in nanoseconds as an aware datetime (microseconds: for messages only)."""
    return _EPOCH + timedelta(microseconds=unix_ns // 1000)


@dataclass(frozen=True)
class DiskFile:
    data: bytes
    mtime_ns: int  # the file's st_mtime_ns


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


def newer_on_disk(mtime_ns: int, timestamp_ns: int) -> bool:
    """RKE2's test, to the second: it compares whole Unix seconds (Go's `Time.Unix()`, a floor),
    so a file 2.1 s newer whose times straddle a second boundary (stored 10.9 s, file 13.0 s)
    counts as 3 s newer. rke2certd must stop exactly where RKE2 would, or it would overwrite a
    file that RKE2 treats as the operator's newer copy."""
    return mtime_ns // _NS - timestamp_ns // _NS >= _NEWER_SLACK_S


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
        elif newer_on_disk(current.mtime_ns, entry.timestamp_ns):
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
