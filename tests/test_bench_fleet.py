"""The fleet benchmark still runs: its load generator drives the product's own agent code
(remote datastore, rollout runner, the plan's waiting line), so a change there can break it
without any other test noticing. A smoke run: 4 simulated agents and one real agent daemon on
three real server daemons, one simulated agent dead; the rollout must finish. The figures of
so small a fleet mean nothing (spread and exponents need sizes): only that it ran is checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fleet.py"


def test_the_fleet_benchmark_runs_a_rollout_to_its_end() -> None:
    args = ["--sizes", "4", "--real-agents", "1", "--idle", "1"]
    args += ["--csr-seconds", "1", "--csr-rate", "2", "--timeout", "300"]
    res = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=840
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Traceback" not in out, out  # a bug in a simulated agent is printed, not raised
    assert re.search(r"rollout [\d.]+ s \(finished\)", out), out
    assert re.search(r"a rollout with one agent dead finishes for the rest\s+ok", out), out
