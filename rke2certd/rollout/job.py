"""The restart command and the health gate after it, run in a thread so that the main loop goes
on pinging the systemd watchdog, answering signals and keeping the status line current.

Every wait is bounded: the restart command by `restart-timeout` (then its process group is
killed), the gate by `health-timeout` (tried again at growing intervals until it passes).
Command output goes to a temporary file, not a pipe: a restart command that leaves a daemon
behind holding its stdout must not keep us waiting for an end-of-file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rke2certd.rollout.health import Probe, run_probes

# The gate is tried again after 0.25 s, then twice as long each time up to 2 s: a restarted
# service is often up within a second, and a slow one is not hammered.
GATE_FIRST, GATE_MAX = 0.25, 2.0
PROBE_TIMEOUT = 5.0
OUTPUT_TAIL = 400


@dataclass(frozen=True)
class JobResult:
    ok: bool
    step: str  # restart | health
    message: str
    restart_seconds: float = 0.0
    health_seconds: float = 0.0


@dataclass(frozen=True)
class Gate:
    """A health gate: a command (exit 0 = healthy) or the built-in probes."""

    command: Sequence[str] | None = None
    probes: Sequence[Probe] = ()


class Cancelled(Exception):
    pass


class RestartJob:
    def __init__(
        self,
        restart: Sequence[str],
        gate: Gate,
        env: Mapping[str, str],
        *,
        restart_timeout: float,
        health_timeout: float,
        wake: Callable[[], None],
    ) -> None:
        self.restart = list(restart)
        self.gate = gate
        self.env = dict(env)
        self.restart_timeout = restart_timeout
        self.health_timeout = health_timeout
        self._wake = wake
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._main, name="rke2certd-restart", daemon=True)
        self.result: JobResult | None = None
        self.step = "restart"
        self.started = time.monotonic()
        self.step_started = self.started

    # -- main loop side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.result is not None

    def describe(self) -> str:
        """For STATUS=: which step, for how long, out of how long."""
        spent = time.monotonic() - self.step_started
        if self.step == "restart":
            return f"restart command running ({spent:.0f}s of {self.restart_timeout:.0f}s)"
        return f"waiting for the health gate ({spent:.0f}s of {self.health_timeout:.0f}s)"

    def cancel(self, wait: float = 5.0) -> None:
        """Stop at once (daemon shutdown): kill the running command and its process group."""
        with self._lock:  # ordered with _command's store of the process: see there
            self._cancel.set()
        self._kill()
        self._thread.join(wait)

    # -- worker thread -------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            result = self._run()
        except Cancelled:
            result = JobResult(False, self.step, "cancelled: rke2certd is stopping")
        except Exception as exc:  # a bug must still end the job, or the node waits forever
            result = JobResult(False, self.step, f"internal error: {type(exc).__name__}: {exc}")
        self.result = result
        self._wake()

    def _run(self) -> JobResult:
        code, output = self._command(self.restart, self.restart_timeout)
        restart_seconds = time.monotonic() - self.started
        if code is None:
            return JobResult(
                False,
                "restart",
                f"restart command {self.restart[0]} did not finish within "
                f"{self.restart_timeout:g}s and was killed{_tail(output)}",
                restart_seconds,
            )
        if code != 0:
            return JobResult(
                False,
                "restart",
                f"restart command {self.restart[0]} exited with {code}{_tail(output)}",
                restart_seconds,
            )
        self.step, self.step_started = "health", time.monotonic()
        problem = self._gate()
        health_seconds = time.monotonic() - self.step_started
        if problem:
            return JobResult(False, "health", problem, restart_seconds, health_seconds)
        return JobResult(True, "health", "healthy", restart_seconds, health_seconds)

    def _gate(self) -> str | None:
        deadline = self.step_started + self.health_timeout
        last = "not checked"
        pause = GATE_FIRST
        while True:
            remaining = deadline - time.monotonic()
            if self.gate.command:
                code, output = self._command(self.gate.command, max(0.1, remaining))
                if code == 0:
                    return None
                last = f"{self.gate.command[0]} exited with {code}{_tail(output)}"
            else:
                problems = run_probes(
                    list(self.gate.probes), min(PROBE_TIMEOUT, max(0.1, remaining))
                )
                if not problems:
                    return None
                last = "; ".join(problems)
            if time.monotonic() + pause > deadline:
                return f"health gate did not pass within {self.health_timeout:g}s: {last}"
            if self._cancel.wait(pause):
                raise Cancelled
            pause = min(GATE_MAX, pause * 2)

    def _command(self, argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
        """(exit code, output); code None when it timed out and was killed."""
        if self._cancel.is_set():
            raise Cancelled
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # its own process group: a timeout kills it all
                )
            except OSError as exc:
                return 127, f": cannot run it: {exc.strerror or exc}"
            # Stored and checked under one lock: a cancel() that came after the check above
            # (and found no process to kill) is seen here, one that comes later finds it.
            with self._lock:
                self._proc = proc
                cancelled = self._cancel.is_set()
            if cancelled:
                self._kill()
            try:
                code: int | None = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                proc.wait()
                code = None
            finally:
                with self._lock:
                    self._proc = None
            if self._cancel.is_set():
                raise Cancelled
            out.seek(0)
            return code, out.read()[-4096:].decode(errors="replace")

    def _kill(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _tail(output: str) -> str:
    text = " ".join(output.split())
    if not text:
        return ""
    return ": " + (text if len(text) <= OUTPUT_TAIL else "..." + text[-OUTPUT_TAIL:])
