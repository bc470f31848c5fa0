"""A server's daemon serves agents (the endpoint of rke2certd/supervisor) on `supervisor-port`.
A port already taken must not stop it from keeping its own certificates valid: it says so in
STATUS= and the journal, and takes the port at the next reload (or rescan)."""

from __future__ import annotations

import signal
import socket
import ssl

from tests.daemon.support import DaemonNode
from tests.harness.wait import SAFETY


def _cacerts(node: DaemonNode, port: int) -> bytes:
    ctx = ssl.create_default_context(cafile=str(node.data / "server/tls/server-ca.crt"))
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /cacerts HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


def test_port_in_use_is_reported_then_taken_on_reload(node: DaemonNode) -> None:
    port = int(node.settings["supervisor-port"])
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", port))
    blocker.listen()
    with node.daemon() as d:
        ready = d.notify.expect("READY")
        assert "NOT serving agents" in ready.fields["STATUS"]
        [failed] = d.events("supervisor_failed")
        assert failed["port"] == port and "free the port or set supervisor-port" in failed["reason"]
        assert (node.data / "server/tls/serving-kube-apiserver.crt").exists()

        blocker.close()
        d.signal(signal.SIGHUP)
        d.notify.expect("RELOADING")
        ready = d.notify.expect("READY")
        assert f"serving agents on port {port}" in ready.fields["STATUS"]
        d.wait_event("supervisor_started", port=port)
        answer = _cacerts(node, port)
        assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith((node.data / "server/tls/server-ca.crt").read_bytes())
        assert d.stop() == 0
    assert d.events("supervisor_stopped")
