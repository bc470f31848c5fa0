"""Backoff with injected sleep and randomness: deterministic, instant."""

from __future__ import annotations

import pytest

from rke2certd.datastore import DatastoreUnavailable
from rke2certd.datastore.retry import backoff_delay, retry
from rke2certd.errors import DatastoreError


class Flaky:
    def __init__(self, failures: int, exc: Exception | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc or DatastoreUnavailable("down")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def test_exponential_with_cap() -> None:
    sleeps: list[float] = []
    with pytest.raises(DatastoreUnavailable):
        retry(Flaky(10), 6, 0.1, 1.0, sleep=sleeps.append, rng=lambda: 1.0)
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


def test_full_jitter_scales_the_whole_delay() -> None:
    assert backoff_delay(3, 0.1, 10.0, lambda: 0.25) == pytest.approx(0.2)
    assert backoff_delay(3, 0.1, 10.0, lambda: 0.0) == 0.0


def test_succeeds_after_transient_failures() -> None:
    fn, sleeps = Flaky(2), list[float]()
    assert retry(fn, 3, 0.1, 1.0, sleep=sleeps.append, rng=lambda: 0.5) == "ok"
    assert fn.calls == 3 and sleeps == pytest.approx([0.05, 0.1])


def test_other_errors_are_not_retried() -> None:
    fn, sleeps = Flaky(1, DatastoreError("permission denied")), list[float]()
    with pytest.raises(DatastoreError, match="permission denied"):
        retry(fn, 5, 0.1, 1.0, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        retry(lambda: 1, 0, 0.1, 1.0)
