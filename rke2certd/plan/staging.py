"""PURE: which staged sets in the watched dir are finished and may be applied.

A set is finished when its `READY` marker exists (written last by the operator), or when it
arrived whole (renamed into the dir, or already there when the daemon started) and nothing in
it changed for the quiet period. A directory created in place and still being written is never
applied without its marker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

READY_MARKER = "READY"
FORCE_MARKER = "FORCE"
DEFAULT_QUIET = 5.0


class Arrival(StrEnum):
    RENAMED = "renamed"  # moved in whole: the operator's "finished" signal
    STARTUP = "startup"  # present when the daemon started
    CREATED = "created"  # made in place: may still be being written


@dataclass(frozen=True)
class SetState:
    name: str
    arrival: Arrival
    last_change: float  # monotonic seconds of the last event inside it
    has_ready: bool


def is_ready(state: SetState, now: float, quiet: float) -> bool:
    if state.has_ready:
        return True
    if state.arrival is Arrival.CREATED:
        return False
    return now - state.last_change >= quiet


def ready_sets(states: Iterable[SetState], now: float, quiet: float) -> list[str]:
    """Finished sets, in name order (one at a time, oldest name first)."""
    return sorted(s.name for s in states if is_ready(s, now, quiet))


def next_deadline(states: Iterable[SetState], quiet: float) -> float | None:
    """When the next waiting set would become ready, if nothing else happens."""
    times = [
        s.last_change + quiet
        for s in states
        if not s.has_ready and s.arrival is not Arrival.CREATED
    ]
    return min(times) if times else None
