"""An agent adopts a rotated server CA only from a server that proves itself with the CA it
already holds; otherwise the token's pin stands and nothing changes. (The good path, a
cross-signed rotation rolled out to agents, is tests/rollout/test_agents.py.)"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.agent_rollout import adopt_rotated_ca, rejoin_renew
from rke2certd.errors import Rke2certdError, TokenError
from rke2certd.supervisor.server import start

from .helpers import HOST, ServerNode, make_server_node, renew_agent, snapshot


def test_a_server_with_an_unrelated_ca_is_not_adopted(
    tmp_path: Path, server: ServerNode, agent_factory: Callable[..., Any]
) -> None:
    agent = agent_factory()
    renew_agent(agent)  # agent/server-ca.crt: the cluster's CA, pinned by the token
    stranger = make_server_node(tmp_path / "stranger", "server-9")
    with start(stranger.node, host=HOST, port=0) as other:
        moved = agent_factory("agent-1", supervisor_port=other.port)
        before = snapshot(moved.layout.data_dir)
        with pytest.raises(Rke2certdError) as err:
            adopt_rotated_ca(moved, server.agent_token)
        assert "does not verify against the pinned CA" in str(err.value)
        assert snapshot(moved.layout.data_dir) == before
    assert other.signed_count == 0


def test_without_a_ca_on_disk_the_pin_stands(
    tmp_path: Path, server: ServerNode, agent_factory: Callable[..., Any]
) -> None:
    stranger = make_server_node(tmp_path / "stranger", "server-9")
    with start(stranger.node, host=HOST, port=0) as other:
        fresh = agent_factory("agent-2", supervisor_port=other.port)
        with pytest.raises(TokenError) as err:
            adopt_rotated_ca(fresh, server.agent_token)
        assert "does not match the join token" in str(err.value)
        assert "no CA on disk" in str(err.value)
        assert not fresh.layout.agent.exists() or not any(fresh.layout.agent.iterdir())


def test_a_token_that_still_fits_changes_nothing(
    server: ServerNode, agent_factory: Callable[..., Any]
) -> None:
    agent = agent_factory()
    renew_agent(agent)
    before = snapshot(agent.layout.data_dir)
    assert adopt_rotated_ca(agent, server.agent_token) is None
    assert snapshot(agent.layout.data_dir) == before


def test_rejoin_refuses_a_server_that_does_not_prove_itself(
    tmp_path: Path, server: ServerNode, agent_factory: Callable[..., Any]
) -> None:
    """The join path of an agent whose token no longer fits: the server must prove itself
    through the chain to the CA on disk; a stranger gets an error and nothing changes."""
    agent = agent_factory()
    renew_agent(agent)
    stranger = make_server_node(tmp_path / "stranger", "server-9")
    with start(stranger.node, host=HOST, port=0) as other:
        moved = agent_factory("agent-1", supervisor_port=other.port)
        before = snapshot(moved.layout.data_dir)
        with pytest.raises(TokenError) as err:
            rejoin_renew(moved, datetime.now(UTC))
        text = str(err.value)
        assert "does not match the join token" in text
        assert "rejoining by the CA on disk failed" in text
        assert "does not verify against the pinned CA" in text
        assert snapshot(moved.layout.data_dir) == before
        fresh = agent_factory("agent-3", supervisor_port=other.port)
        with pytest.raises(TokenError, match="no CA on disk"):
            rejoin_renew(fresh, datetime.now(UTC))
    assert other.signed_count == 0


def test_rejoin_with_a_fitting_token_is_a_renew(
    server: ServerNode, agent_factory: Callable[..., Any]
) -> None:
    agent = agent_factory()
    result, adopted = rejoin_renew(agent, datetime.now(UTC))
    assert adopted is None and result.changes
    assert rejoin_renew(agent, datetime.now(UTC))[0].changes == []
