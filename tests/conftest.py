"""Fixtures shared by every suite: a node on disk, the CLI in a subprocess, an injected clock.

    cfg, data = make_node(tmp_path, node_name="node-b", roles=["agent"])
    res = run_cli("-c", cfg, "renew", "-o", "json")      # a real `python -m rke2certd` process
    assert res.returncode == 0, res.stderr
    now = clock()                                        # frozen; clock.advance(days=300)

Every CLI call passes `-c <tmp config>`: the machine's /etc/rke2certd/config.yaml is never read.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.harness...` imports work however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.harness import seed as test_seed  # noqa: E402 (needs the path above)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        default=None,
        help=f"the random seed of the fault and fuzz tests: a number, or 'random' for a new one "
        f"(default: ${test_seed.ENV}, else {test_seed.FIXED_SEED})",
    )


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("--seed")
    if option is not None:
        os.environ[test_seed.ENV] = str(option)
    test_seed.run_seed()  # resolves 'random' once, for the whole run


def pytest_report_header(config: pytest.Config) -> str:
    seed = test_seed.run_seed()
    return f"rke2certd random seed: {seed} (replay with --seed {seed})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    seed = test_seed.run_seed()  # also under -q, which hides the header
    terminalreporter.write_line(f"rke2certd random seed: {seed} (replay with --seed {seed})")


# The caches (config, certificate facts) of this test process and the CLI processes it starts
# live here, not in the machine's /var/cache/rke2certd (the tests run as root).
RUNTIME_DIR = tempfile.mkdtemp(prefix="rke2certd-test-run-")
atexit.register(shutil.rmtree, RUNTIME_DIR, True)
os.environ["RKE2CERTD_CACHE_DIR"] = RUNTIME_DIR
# Nothing of the machine's RKE2 (its /etc/rancher/rke2/config.yaml, installed units) is read:
# a test that wants an RKE2 config names it (`rke2-config`), or sets these itself.
os.environ["RKE2CERTD_RKE2_CONFIG"] = ""
os.environ["RKE2CERTD_UNIT_DIRS"] = ""

# A node whose every SAN source is set, so profile tests can name each expected SAN.
DEFAULT_NODE: dict[str, Any] = {
    "node-name": "node-a",
    "node-ip": ["192.0.2.10"],
    "tls-san": ["rke2.example.test", "203.0.113.7"],
}


def write_node_config(tmp_path: Path, **config: Any) -> tuple[Path, Path]:
    """Write `<tmp_path>/rke2certd.yaml` and return (config path, data dir).

    Keyword names use `_` for `-` (`renew_before_days=30`); a value of None drops a default key.
    The data dir is `<tmp_path>/data` unless `data_dir` is given; it is not created here.
    """
    doc: dict[str, Any] = dict(DEFAULT_NODE)
    doc["data-dir"] = str(tmp_path / "data")
    for key, value in config.items():
        name = key.replace("_", "-")
        if value is None:
            doc.pop(name, None)
        else:
            doc[name] = str(value) if isinstance(value, Path) else value
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "rke2certd.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg, Path(doc["data-dir"])


@pytest.fixture
def make_node() -> Callable[..., tuple[Path, Path]]:
    """`make_node(tmp_path, **config)` -> (config path, data dir); see write_node_config."""
    return write_node_config


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the CLI sees: a PATH, a locale, the test run's cache dir and this checkout on
    PYTHONPATH, nothing of this shell (no other RKE2CERTD_* or PYTHON* settings, no
    JOURNAL_STREAM/INVOCATION_ID that would send logs to the journal)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/",
        "RKE2CERTD_CACHE_DIR": RUNTIME_DIR,
        "RKE2CERTD_RKE2_CONFIG": "",
        "RKE2CERTD_UNIT_DIRS": "",
        # This checkout's code, not whichever tree the package is installed (editable) from.
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra or {})
    return env


def run_cli(
    *args: object,
    python: str = sys.executable,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m rke2certd ARGS` in a subprocess with a clean env; capture stdout/stderr.

    `prefix` runs it under another program (e.g. setpriv to drop root).
    """
    cmd = [*prefix, python, "-m", "rke2certd", *(str(a) for a in args)]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd="/",  # nothing may depend on the caller's directory
        timeout=timeout,
        check=False,
    )


@pytest.fixture(name="run_cli")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


class FrozenClock:
    """An injected clock (rke2certd.clock.Clock): `clock()` is a fixed UTC instant until moved.

    Whole seconds, because certificate times have a one-second resolution.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def at(self, **delta: float) -> datetime:
        """The instant `delta` away from the clock's time (the clock does not move)."""
        return self.now + timedelta(**delta)

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> FrozenClock:
    """Starts at the real time (so the CLI, which reads the real clock, agrees with it)."""
    return FrozenClock()
