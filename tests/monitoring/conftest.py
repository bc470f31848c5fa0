"""Fixtures of the monitoring tests: the session's captured logs and a daemon node per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.support import CapturedLogs, DaemonNode, free_port, label_of


@pytest.fixture(scope="session")
def captured_logs_dir(tmp_path_factory: pytest.TempPathFactory) -> CapturedLogs:
    return CapturedLogs.for_session(tmp_path_factory)


@pytest.fixture
def node(
    tmp_path: Path, captured_logs_dir: CapturedLogs, request: pytest.FixtureRequest
) -> DaemonNode:
    """An empty server node with metrics on a free loopback port and a textfile dir."""
    return DaemonNode.create(
        tmp_path / "node",
        captured_logs_dir,
        label_of(request),
        metrics_address=f"127.0.0.1:{free_port()}",
        textfile_dir=str(tmp_path / "textfile"),
        write_kubeconfig=str(tmp_path / "etc" / "rke2.yaml"),
    )
