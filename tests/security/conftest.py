"""Fixtures of the threat tests: a real server node, its endpoint on loopback over real TLS with a
real SQLite datastore behind the cluster route, and every structlog event of the test; the daemon
tests' fixtures (a node per test, the session's captured logs), so that the staging threats run the
same real daemon and their logs are grepped for secrets like the others'."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA
from rke2certd.supervisor.server import SupervisorHandle, start
from tests.agent.helpers import ServerNode, make_server_node
from tests.daemon.conftest import captured_logs_dir, node

NOW = datetime(2030, 1, 2, tzinfo=UTC)

__all__ = ["captured_logs_dir", "node"]


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    yield
    structlog.configure(**old)


@pytest.fixture
def server(tmp_path: Path) -> ServerNode:
    return make_server_node(tmp_path / "server")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "coord.sqlite") as ds:
        yield ds


@pytest.fixture
def endpoint(server: ServerNode, store: SQLiteDatastore) -> Iterator[SupervisorHandle]:
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
    handle = start(server.node, host="127.0.0.1", port=0, cluster=api)
    yield handle
    handle.stop()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    with capture_logs() as captured:
        yield captured
    structlog.configure(**old)
