"""`rke2certd run` on an agent-only node: certificates through a server's endpoint at start; when
no server answers (they may be rebooting too), it starts on the certificates it has and tries
again, and without usable certificates it fails to start as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.supervisor.server import start
from tests.daemon.support import CapturedLogs, DaemonProcess, NotifySocket

from .helpers import HOST, ServerNode


def _agent_config(root: Path, server: ServerNode, port: int, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "rke2certd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data-dir": str(root / "data"),
                "roles": ["agent"],
                "node-name": name,
                "node-ip": ["127.0.0.1"],
                "server": "https://127.0.0.1:9345",
                "supervisor-port": port,
                "token": server.agent_token,
                "log-format": "json",
                "rescan-interval": 1,  # the retry while the servers are away: every second here
                "node-password-file": str(root / "node-password"),
                "metrics-address": "",  # not the shared default port
            }
        )
    )
    cfg.chmod(0o600)
    return cfg


@pytest.fixture
def logs(tmp_path_factory: pytest.TempPathFactory, server: ServerNode) -> CapturedLogs:
    captured = CapturedLogs.for_session(tmp_path_factory)
    captured.add_secret(server.password)
    return captured


def test_agent_daemon_starts_on_its_certs_while_the_server_is_away(
    tmp_path: Path, server: ServerNode, logs: CapturedLogs
) -> None:
    # No cluster datastore: the agent cannot join yet (its node password goes to a local store).
    passwords = SQLiteDatastore(tmp_path / "node-passwords.sqlite")
    handle = start(server.node, host=HOST, port=0, passwords=passwords)
    port = handle.port
    cfg = _agent_config(tmp_path / "agent", server, port, "agent-7")
    agent_dir = tmp_path / "agent" / "data" / "agent"
    notify = NotifySocket()
    d = DaemonProcess(cfg, logs.new_file("agent-daemon-up"), notify)
    try:
        ready = notify.expect("READY")
        assert (agent_dir / "client-kubelet.crt").exists()
        assert "servers unreachable" not in ready.fields["STATUS"]
        d.wait_event("rollout_join_deferred")  # 503: this server has no datastore
        assert d.stop() == 0
    finally:
        d.kill()
        notify.close()

    handle.stop()  # the server goes away; the agent restarts (a reboot, say)
    notify = NotifySocket()
    d = DaemonProcess(cfg, logs.new_file("agent-daemon-away"), notify)
    try:
        ready = notify.expect("READY")
        assert "servers unreachable, on the certificates on disk" in ready.fields["STATUS"]
        deferred = d.wait_event("renew_deferred")
        assert "cannot reach the server" in deferred["reason"]
        # the server is back on its port: the next attempt renews again
        with start(server.node, host=HOST, port=port, passwords=passwords):
            d.wait_event("renew_resumed", timeout=30)
            status = notify.expect("STATUS", None)
            assert "servers unreachable" not in status.fields["STATUS"]
        assert d.stop() == 0
    finally:
        d.kill()
        notify.close()
        passwords.close()
    assert not d.stray_lines()


def test_agent_daemon_without_certs_needs_a_server(
    tmp_path: Path, server: ServerNode, logs: CapturedLogs
) -> None:
    with start(server.node, host=HOST, port=0) as gone:
        port = gone.port
    cfg = _agent_config(tmp_path / "fresh", server, port, "agent-8")
    d = DaemonProcess(cfg, logs.new_file("agent-daemon-fresh"), None)
    try:
        assert d.proc.wait(timeout=60) == 1
        failed = d.events("startup_failed")
        assert failed and "cannot reach the server" in failed[0]["reason"]
    finally:
        d.kill()
