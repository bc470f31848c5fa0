"""The server/agent seam, in process: the factory picks the role once from the config, and
the signal flags say which signal asked to stop."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rke2certd.config import load_config
from rke2certd.daemon.signals import Flags
from rke2certd.node.node import Node
from rke2certd.pki.profiles import AGENT_UNIT, SERVER_UNIT
from rke2certd.roles import AgentNode, ServerNode, role_for
from rke2certd.roles.server import FIRST_START


def _node(tmp_path: Path, **extra: object) -> Node:
    settings = {"data-dir": str(tmp_path / "data"), "node-name": "n1", **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings, default=str))  # JSON is YAML
    return Node.from_config(load_config(path))


def test_a_server_is_chosen_by_its_roles(tmp_path: Path) -> None:
    role = role_for(_node(tmp_path))
    assert isinstance(role, ServerNode)
    assert role.unit == SERVER_UNIT and role.serves_agents and not role.joins_late
    assert role.datastore is None and role.store is None  # nothing opened by choosing


def test_an_agent_only_node_is_chosen_by_its_roles(tmp_path: Path) -> None:
    role = role_for(_node(tmp_path, roles=["agent"], server="https://10.0.0.1:9345"))
    assert isinstance(role, AgentNode)
    assert role.unit == AGENT_UNIT and not role.serves_agents and role.joins_late
    assert role.staging is None and role.datastore is None


def test_an_agent_needs_a_server_for_datastore_commands(tmp_path: Path) -> None:
    from rke2certd.commands.renew import NeedsServerError

    role = role_for(_node(tmp_path, roles=["agent"], server="https://10.0.0.1:9345"))
    needs = "this command reads the datastore: run it on a server"
    with pytest.raises(NeedsServerError, match="run it on a server"), role.cluster_datastore(needs):
        pass


def test_a_server_waits_for_rke2s_first_start_only_on_an_rke2_node(tmp_path: Path) -> None:
    assert role_for(_node(tmp_path)).first_start() is None  # standalone: nothing to wait for
    rke2 = tmp_path / "rke2.yaml"
    rke2.write_text("token: x\n")
    assert role_for(_node(tmp_path, **{"rke2-config": rke2})).first_start() == FIRST_START


def test_what_the_metrics_show_comes_from_the_role(tmp_path: Path) -> None:
    """The monitor asks the role which CA files, routes and generation a node has."""
    from rke2certd.commands.renew import renew
    from rke2certd.node.ca_material import disk_generation
    from rke2certd.supervisor.server import ROUTES

    server = role_for(_node(tmp_path / "s"))
    layout = server.node.layout
    assert server.served_routes == ROUTES
    assert layout.ca_cert("server-ca") in server.ca_files()
    assert layout.agent_server_ca in server.ca_files()
    renew(server.node, datetime.now(UTC))
    assert server.disk_generation() == disk_generation(layout) is not None

    agent = role_for(_node(tmp_path / "a", roles=["agent"], server="https://10.0.0.1:9345"))
    a = agent.node.layout
    assert agent.served_routes == frozenset()
    assert agent.ca_files() == [a.agent_server_ca, a.agent_client_ca]
    assert agent.disk_generation() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_flags_name_the_stop_signal(sig: signal.Signals) -> None:
    flags = Flags()
    flags.on_signal(sig, None)
    assert flags.stop and not flags.reload and flags.stop_signal == sig.name


def test_sighup_asks_for_a_reload_not_a_stop() -> None:
    flags = Flags()
    flags.on_signal(signal.SIGHUP, None)
    assert flags.reload and not flags.stop
