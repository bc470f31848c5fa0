"""Bounded exponential backoff with full jitter, for transient datastore failures.

Full jitter (sleep a uniform random time in [0, min(cap, base * 2**n)]) spreads the retries of
many nodes that lost the datastore at the same moment, so they do not come back in lockstep.
`sleep` and `rng` are injected so that tests are deterministic and take no time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from rke2certd.datastore.base import DatastoreUnavailable

T = TypeVar("T")

# The CLI fails fast: three tries within about a second, then a clear error.
CLI_ATTEMPTS = 3
CLI_BASE = 0.2
CLI_CAP = 1.0


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float]) -> float:
    """The pause before retry number `attempt` (0-based): uniform in [0, min(cap, base*2^n)]."""
    return rng() * min(cap, base * 2.0**attempt)


def retry(
    fn: Callable[[], T],
    attempts: int,
    base: float,
    cap: float,
    *,
    retry_on: tuple[type[BaseException], ...] = (DatastoreUnavailable,),
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call `fn` up to `attempts` times while it raises one of `retry_on`; re-raise the last.

    Any other exception propagates at once: only failures that a pause can cure are retried.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts - 1):
        try:
            return fn()
        except retry_on:
            sleep(backoff_delay(attempt, base, cap, rng))
    return fn()
