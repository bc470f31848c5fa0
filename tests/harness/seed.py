"""The one random seed of a test run: fixed unless asked otherwise, and printed in the header.

    python3 -m pytest                          # seed 1313 (CI: every run the same)
    python3 -m pytest --seed 987654            # replay a run (or RKE2CERTD_TEST_SEED=987654)
    python3 -m pytest --seed random -m slow    # a new seed (printed), to look for new failures

Every test that draws random numbers takes them from `rng(name)`: its own stream, derived from
the run's seed and the test's name, so one test replays alone with the same numbers.
"""

from __future__ import annotations

import os
import random

ENV = "RKE2CERTD_TEST_SEED"
FIXED_SEED = 1313


def run_seed() -> int:
    """The run's seed. `random` is resolved once and written back to the environment, so every
    later call (and every subprocess) sees the same number."""
    value = os.environ.get(ENV, "").strip()
    if value == "random":
        value = str(random.SystemRandom().randrange(1 << 32))
        os.environ[ENV] = value
    if not value:
        return FIXED_SEED
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: give a whole number, or 'random'") from None


def rng(name: str) -> random.Random:
    """A random stream of its own for `name` (a test's name), from the run's seed."""
    return random.Random(f"{run_seed()}:{name}")
