"""RestartJob: the restart command and health gate off the main loop, every wait bounded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rke2certd.rollout.health import Probe
from rke2certd.rollout.job import Gate, JobResult, RestartJob

OK = Gate(["true"])


def run(restart: list[str], gate: Gate = OK, *, timeout: float = 5, health: float = 5,
        env: dict[str, str] | None = None) -> JobResult:  # fmt: skip
    woken = threading.Event()
    job = RestartJob(
        restart, gate, env or {"PATH": os.environ["PATH"]},
        restart_timeout=timeout, health_timeout=health, wake=woken.set,
    )  # fmt: skip
    job.start()
    assert woken.wait(30), "the job never woke the loop"
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
    started = time.monotonic()
    res = run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert time.monotonic() - started < 5
    assert not res.ok and "did not finish within 0.5s and was killed" in res.message
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the restart command's child survived"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_output_is_not_a_pipe_a_lingering_daemon_does_not_hold_us() -> None:
    started = time.monotonic()
    res = run(["sh", "-c", "sleep 5 & echo started"])
    assert res.ok and time.monotonic() - started < 3


def test_gate_is_tried_again_until_it_passes(tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    threading.Timer(0.6, flag.touch).start()
    res = run(["true"], Gate(["test", "-e", str(flag)]))
    assert res.ok and 0.5 < res.health_seconds < 3


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
def test_cancel_stops_at_once(where: str) -> None:
    woken = threading.Event()
    restart = ["sleep", "30"] if where == "restart" else ["true"]
    gate = Gate(["false"])
    job = RestartJob(
        restart, gate, {"PATH": os.environ["PATH"]},
        restart_timeout=60, health_timeout=60, wake=woken.set,
    )  # fmt: skip
    job.start()
    time.sleep(0.5)
    assert job.describe().startswith("restart command running" if where == "restart"
                                     else "waiting for the health gate")  # fmt: skip
    started = time.monotonic()
    job.cancel()
    assert woken.wait(5) and time.monotonic() - started < 5
    assert job.result is not None and not job.result.ok
    assert job.result.message == "cancelled: rke2certd is stopping"
