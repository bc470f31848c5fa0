"""Threats through the node's own files, each tried with the real CLI on real files:

- the node lock (`<data-dir>/rke2certd.lock`) replaced by a symlink, a hard link, a FIFO or a
  directory: every writing command truncates the lock file and writes its pid into it, so a
  link there would truncate whatever it names. Refused with a clear error, the target untouched;
- a configuration error makes `rke2certd run` exit with EX_CONFIG (78), a status kept for it
  alone, so that systemd's RestartPreventExitStatus=78 ends the unit failed, not restarting
  forever (tests/systemd/test_daemon_systemd.py checks the unit under real systemd).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rke2certd.files.lock import LOCK_NAME
from tests.conftest import run_cli, write_node_config

EX_CONFIG = 78


def _symlink(lock: Path, victim: Path) -> None:
    lock.symlink_to(victim)


def _dangling(lock: Path, victim: Path) -> None:
    victim.unlink()
    lock.symlink_to(victim)


def _hardlink(lock: Path, victim: Path) -> None:
    os.link(victim, lock)


def _fifo(lock: Path, _victim: Path) -> None:
    os.mkfifo(lock, 0o600)


def _directory(lock: Path, _victim: Path) -> None:
    lock.mkdir()


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (_symlink, "is a symbolic link"),
        (_dangling, "is a symbolic link"),
        (_hardlink, "has 2 hard links"),
        (_fifo, "is not a regular file"),
        (_directory, "is a directory"),
    ],
    ids=["symlink", "dangling-symlink", "hardlink", "fifo", "directory"],
)
def test_a_lock_file_that_is_not_a_plain_file_of_ours_is_refused_untouched(
    tmp_path: Path, plant: Callable[[Path, Path], None], says: str
) -> None:
    cfg, data = write_node_config(tmp_path)
    data.mkdir(mode=0o755)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    lock = data / LOCK_NAME
    plant(lock, victim)
    r = run_cli("-c", cfg, "renew")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert f"rke2certd: error: the node lock {lock} {says}" in r.stderr, r.stderr
    assert "remove it" in r.stderr  # says what to do
    if victim.exists():
        assert victim.read_text() == "precious\n"  # not truncated, no pid written
    else:
        assert not victim.exists()  # a dangling link's target is not created either
    assert not (data / "server/tls/server-ca.crt").exists()  # nothing done without the lock


def test_a_lock_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    cfg, data = write_node_config(tmp_path)
    data.mkdir(mode=0o755)
    lock = data / LOCK_NAME
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    r = run_cli("-c", cfg, "renew")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is owned by uid 65534" in r.stderr, r.stderr


def test_a_plain_lock_file_is_still_used(tmp_path: Path) -> None:
    cfg, data = write_node_config(tmp_path)
    r = run_cli("-c", cfg, "renew")
    assert r.returncode == 0, r.stderr
    assert (data / LOCK_NAME).read_text().strip().isdigit()  # the pid of the last holder
    assert run_cli("-c", cfg, "renew").returncode == 0  # and again, on the file it made


@pytest.mark.parametrize(
    "bad",
    ["no-such-key: 1\n", "renew-before-days: many\n", "node-name: [\n"],
    ids=["unknown-key", "bad-value", "bad-yaml"],
)
def test_a_config_error_ends_run_with_ex_config_and_says_why(tmp_path: Path, bad: str) -> None:
    cfg, _data = write_node_config(tmp_path)
    cfg.write_text(cfg.read_text() + bad)
    r = run_cli("-c", cfg, "run", timeout=60)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "rke2certd: error: " in r.stderr, r.stderr
    assert str(cfg) in r.stderr  # names the file to fix
