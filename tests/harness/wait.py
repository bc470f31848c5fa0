"""Waiting in tests without measuring time.

    wait_for(lambda: path.exists(), "the status file")        # polls; returns the truthy value
    job = in_background(lambda: ds.watch_prefix(ns, rev, timeout=HANG))
    ...
    events = job.result()                                      # the call's value, or its error

A test waits for a condition, never for a time. `SAFETY` only turns a hang into a failure: it
is far beyond anything a loaded machine needs, and a test never asserts how long something
took. To prove that a call returned *because of* an event (not at its own timeout), give the
call a timeout of `HANG`, longer than `SAFETY`: then only the event can end it in time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

SAFETY = 120.0  # seconds before a wait that never ends counts as a hang
HANG = 3600.0  # a timeout for the product that only an event (not the timeout) can end in time


def wait_for(
    cond: Callable[[], T],
    what: str = "the condition",
    timeout: float = SAFETY,
    poll: float = 0.02,
) -> T:
    """Call `cond` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met after {timeout:g}s (a hang)")
        time.sleep(poll)


class Background(Generic[T]):
    """A call running in a daemon thread (a hung call cannot keep pytest from exiting)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float = SAFETY) -> T:
        """The call's value (or its exception raised here); fail if it has not returned."""
        if not self._done.wait(timeout):
            raise AssertionError(f"the background call did not return in {timeout:g}s (a hang)")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def in_background(fn: Callable[[], T]) -> Background[T]:
    return Background(fn)
