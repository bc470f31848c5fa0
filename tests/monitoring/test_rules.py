"""The shipped alert rules: valid for Prometheus, and their unit tests pass (`promtool test
rules`: a leaf left inside the window after a rescan, an expired one, a CA within two years
of expiry, a leaf whose chain broke, a stopped rollout, no rescans, the datastore away; each
fires and clears)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool missing: scripts/ci-system-deps.sh installs prometheus"
)


@needs_promtool
def test_the_rules_are_valid() -> None:
    r = subprocess.run(
        [str(promtool), "check", "rules", str(RULES / "rke2certd.rules.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout + r.stderr


@needs_promtool
def test_the_rules_unit_tests_pass() -> None:
    r = subprocess.run(
        [str(promtool), "test", "rules", "rke2certd.rules.test.yml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULES,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
