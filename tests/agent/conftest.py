"""Fixtures of the agent tests: a real server node, its endpoint on loopback, agent-only nodes.

The server node is made by `renew()` (self-signed CA set on disk) and its tokens by
`write_tokens()`, exactly as on a real server; the endpoint listens on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import SupervisorHandle, start

from .helpers import (
    ServerNode,
    agent_on,
    make_agent_node,
    make_server_node,
    start_cluster_endpoint,
)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """In-process renewals log every decision; keep warnings so failures stay readable."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**old)


@pytest.fixture
def server(tmp_path: Path) -> ServerNode:
    return make_server_node(tmp_path / "server")


@pytest.fixture
def endpoint(server: ServerNode, tmp_path: Path) -> Iterator[SupervisorHandle]:
    """The endpoint without a cluster datastore; node passwords go to a real SQLite store."""
    with SQLiteDatastore(tmp_path / "node-passwords.sqlite") as passwords:
        handle = start(server.node, host="127.0.0.1", port=0, passwords=passwords)
        yield handle
        handle.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    """The coordination keys of the cluster-route tests: a real SQLite store."""
    with SQLiteDatastore(tmp_path / "coord.sqlite") as ds:
        yield ds


@pytest.fixture
def cluster_endpoint(server: ServerNode, store: SQLiteDatastore) -> Iterator[SupervisorHandle]:
    """The endpoint with the cluster route on `store`, its clock at NOW."""
    with start_cluster_endpoint(server, store) as handle:
        yield handle


@pytest.fixture
def agent_factory(
    tmp_path: Path, endpoint: SupervisorHandle, server: ServerNode
) -> Callable[..., Any]:
    """`agent_factory(name="agent-1", token=None, **config)` -> an agent-only Node."""

    def build(name: str = "agent-1", token: str | None = None, **config: Any) -> Any:
        config.setdefault("supervisor_port", endpoint.port)
        return make_agent_node(tmp_path / name, token or server.agent_token, name, **config)

    return build


@pytest.fixture
def remote_for(
    cluster_endpoint: SupervisorHandle, server: ServerNode, agent_factory: Callable[..., Any]
) -> Callable[[str], tuple[Node, RemoteDatastore]]:
    """`remote_for(name)` -> an agent-only node of the cluster endpoint, renewed through it,
    and its coordination keys through that endpoint."""

    def make(name: str) -> tuple[Node, RemoteDatastore]:
        return agent_on(cluster_endpoint.port, server, agent_factory, name)

    return make


@pytest.fixture
def agent(agent_factory: Callable[..., Any]) -> Any:
    return agent_factory()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event of the test, from every thread (the endpoint's included)."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    with capture_logs() as captured:
        yield captured
    structlog.configure(**old)
