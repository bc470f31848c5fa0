"""How the outside reaches the main loop: signals and the helper threads' wake-ups.

Signal handlers only set a flag (and the kernel writes a byte to the wake-up pipe); the
watcher, the cluster link and a restart job's thread only poke the pipe. The loop does the work.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from dataclasses import dataclass
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Wakeup:
    """A self-pipe: signals (via set_wakeup_fd) and the helper threads write to it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: already awake
            os.write(self.w, b"w")

    def wait(self, timeout: float) -> None:
        select.select([self.r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 512):
                pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class Flags:
    """What the signals asked for; `stop_signal` names the one that asked to stop."""

    stop: bool = False
    reload: bool = False
    stop_signal: str = "SIGTERM"

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only set flags: the work happens on the main loop.
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop_signal = signal.Signals(signum).name
            self.stop = True


def install(flags: Flags, wake: Wakeup) -> None:
    for sig in HANDLED:
        signal.signal(sig, flags.on_signal)
    signal.set_wakeup_fd(wake.w, warn_on_full_buffer=False)


def uninstall() -> None:
    signal.set_wakeup_fd(-1)
