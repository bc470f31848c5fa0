"""PURE: which staged sets in the watched dir are finished and may be applied.

A set is finished when its `READY` marker exists (written last by the operator), or when it
arrived whole (renamed into the dir, or already there when the daemon started) and nothing in
it changed for the quiet period. A directory created in place and still being written is never
applied without its marker. Sets go one at a time in name order: a set still in its quiet
period holds back the finished sets named after it.
"""

from __future__ import annotations

import math
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


def _schedule(states: Iterable[SetState], quiet: float) -> list[tuple[str, float]]:
    """(name, when it may be applied) in name order, for every set that can become finished.

    A set may go when it is finished and every set named before it that is still waiting for
    its quiet period has gone: sets staged together go in name order, whichever was renamed in
    first. A set made in place without its marker is left out and holds nothing back (it may
    never be finished). The times never decrease along the list.
    """
    out: list[tuple[str, float]] = []
    hold = -math.inf
    for s in sorted(states, key=lambda s: s.name):
        if s.has_ready:
            own = -math.inf
        elif s.arrival is Arrival.CREATED:
            continue
        else:
            own = s.last_change + quiet
        hold = max(hold, own)
        out.append((s.name, hold))
    return out


def ready_sets(states: Iterable[SetState], now: float, quiet: float) -> list[str]:
    """Finished sets, in name order (one at a time, first name first): the ones whose time has
    come, which are always a prefix of the name order (see _schedule)."""
    return [name for name, when in _schedule(states, quiet) if when <= now]


def next_deadline(states: Iterable[SetState], quiet: float) -> float | None:
    """When the next waiting set may go, if nothing else happens (a set with its marker and
    nothing before it to wait for goes at once: it is no deadline)."""
    times = [when for _, when in _schedule(states, quiet) if when != -math.inf]
    return min(times) if times else None
