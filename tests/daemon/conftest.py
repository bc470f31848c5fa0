"""Fixtures of the daemon tests (no systemd): the session's captured logs and a node per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.support import CapturedLogs, DaemonNode, label_of


@pytest.fixture(scope="session")
def captured_logs_dir(tmp_path_factory: pytest.TempPathFactory) -> CapturedLogs:
    """Every daemon/CLI stderr of these tests is filed here; tests/test_no_secrets_in_logs.py
    greps it for keys, tokens and the passwords recorded in it."""
    return CapturedLogs.for_session(tmp_path_factory)


@pytest.fixture
def node(
    tmp_path: Path, captured_logs_dir: CapturedLogs, request: pytest.FixtureRequest
) -> DaemonNode:
    """An empty server node (the daemon's start-up creates its CAs and certificates)."""
    return DaemonNode.create(tmp_path / "node", captured_logs_dir, label_of(request))
