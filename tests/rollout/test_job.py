"""RestartJob: the restart command and health gate off the main loop, every wait bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from rke2certd.rollout.health import Probe
from rke2certd.rollout.job import Gate, JobResult, RestartJob
from tests.harness.wait import HANG, SAFETY, wait_for

OK = Gate(["true"])


def run(
    restart: list[str],
    gate: Gate = OK,
    *,
    timeout: float = 60,
    health: float = 60,
    env: dict[str, str] | None = None,
) -> JobResult:
    woken = threading.Event()
    job = RestartJob(
        restart,
        gate,
        env or {"PATH": os.environ["PATH"]},
        restart_timeout=timeout,
        health_timeout=health,
        wake=woken.set,
    )
    job.start()
    assert woken.wait(SAFETY), "the job never woke the loop"
    assert job.done and job.result is not None
    return job.result


def test_restart_then_gate() -> None:
    res = run(["true"])
    assert res.ok and res.step == "health" and res.message == "healthy"


def test_failing_restart_says_why() -> None:
    res = run(["sh", "-c", "echo 'unit rke2-server not found' >&2; exit 5"])
    assert not res.ok and res.step == "restart"
    assert res.message == "restart command sh exited with 5: unit rke2-server not found"


def test_missing_program() -> None:
    res = run(["/nonexistent/systemctl", "restart"])
    assert not res.ok and "exited with 127: : cannot run it" in res.message


def test_restart_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # a child of HANG seconds: only the kill lets run() return within its safety deadline
    res = run(["sh", "-c", f"sleep {HANG:g} & echo $! > {pidfile}; wait"], timeout=0.5)
    assert not res.ok and "did not finish within 0.5s and was killed" in res.message
    pid = int(pidfile.read_text())
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid),
        "the restart command's child to be killed",
    )


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_output_is_not_a_pipe_a_lingering_daemon_does_not_hold_us(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    # the lingering child lives HANG seconds: run() returning at all shows it did not wait
    try:
        res = run(["sh", "-c", f"sleep {HANG:g} & echo $! > {pidfile}; echo started"])
        assert res.ok
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_gate_is_tried_again_until_it_passes(tmp_path: Path) -> None:
    flag, tries = tmp_path / "healthy", tmp_path / "tries"
    gate = Gate(["sh", "-c", f"echo >> {tries}; test -e {flag}"])
    healthy_after = threading.Thread(target=_touch_after_tries, args=(tries, 2, flag))
    healthy_after.start()
    res = run(["true"], gate, health=HANG)
    healthy_after.join()
    assert res.ok and res.health_seconds > 0
    assert len(tries.read_text().splitlines()) >= 3  # failed twice, then passed


def _touch_after_tries(tries: Path, n: int, flag: Path) -> None:
    wait_for(lambda: tries.exists() and len(tries.read_text().splitlines()) >= n, "gate tries")
    flag.touch()


def test_gate_timeout_keeps_the_last_reason() -> None:
    res = run(["true"], Gate(["sh", "-c", "echo apiserver not ready; exit 1"]), health=0.6)
    assert not res.ok and res.step == "health"
    assert res.message.startswith("health gate did not pass within 0.6s: sh exited with 1")
    assert "apiserver not ready" in res.message


def test_probe_gate() -> None:
    calls: list[float] = []

    def probe(timeout: float) -> str | None:
        calls.append(timeout)
        return None if len(calls) >= 2 else "connection refused"

    res = run(["true"], Gate(None, [Probe("etcd /health", probe)]))
    assert res.ok and len(calls) == 2
    res = run(["true"], Gate(None, [Probe("etcd /health", lambda _t: "refused")]), health=0.3)
    assert not res.ok and res.message.endswith("etcd /health: refused")


def test_environment_is_passed(tmp_path: Path) -> None:
    out = tmp_path / "env"
    env = {"PATH": os.environ["PATH"], "RKE2CERTD_ROLLOUT": "ca-123"}
    res = run(["sh", "-c", f'echo "$RKE2CERTD_ROLLOUT" > {out}'], env=env)
    assert res.ok and out.read_text().strip() == "ca-123"


@pytest.mark.parametrize("where", ["restart", "gate"])
def test_cancel_stops_at_once(where: str, tmp_path: Path) -> None:
    woken = threading.Event()
    started = tmp_path / "started"  # the restart command is running (not about to be started)
    running = f"echo $$ > {started}; exec sleep {HANG:g}"
    restart = ["sh", "-c", running] if where == "restart" else ["true"]
    gate = Gate(["false"])
    job = RestartJob(
        restart,
        gate,
        {"PATH": os.environ["PATH"]},
        restart_timeout=HANG,
        health_timeout=HANG,
        wake=woken.set,
    )
    job.start()
    step = "restart command running" if where == "restart" else "waiting for the health gate"
    wait_for(lambda: job.describe().startswith(step), step)
    if where == "restart":
        wait_for(started.exists, "the restart command to run")
    job.cancel()
    # at once: the command and the gate would run for HANG seconds
    assert woken.wait(SAFETY)
    assert job.result is not None and not job.result.ok
    assert job.result.message == "cancelled: rke2certd is stopping"


def test_a_cancel_while_the_command_starts_kills_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel comes after the job checked for one and before it stored the process it
    started (the real Popen, held back by a wrapper until the cancel was made): the process
    is killed at once, not left to run out the restart timeout."""
    real_popen = subprocess.Popen
    spawned, cancelled = threading.Event(), threading.Event()
    procs: list[subprocess.Popen[bytes]] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real_popen(*args, **kwargs)
        procs.append(proc)
        spawned.set()
        assert cancelled.wait(SAFETY), "the test never cancelled"
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    woken = threading.Event()
    job = RestartJob(
        ["sleep", f"{HANG:g}"],
        OK,
        {"PATH": os.environ["PATH"]},
        restart_timeout=HANG,
        health_timeout=HANG,
        wake=woken.set,
    )
    job.start()
    wait_for(spawned.is_set, "the restart command to be started")
    job.cancel(wait=0)  # the job's thread is inside Popen: do not wait for it here
    cancelled.set()
    assert woken.wait(SAFETY), "the cancelled job ran on (it would for HANG seconds)"
    assert job.result is not None and job.result.message == "cancelled: rke2certd is stopping"
    assert procs[0].returncode == -signal.SIGKILL
