"""A stand-in for the TLS ports of an RKE2 node (etcd's client port, the apiserver's secure
port, later the kubelet's): HTTPS that requires a client certificate, answering `/health` as
etcd does and `/readyz` as the apiserver does. The simulated cluster's restart command starts
it with the node's certificates as they are on disk, so the health gate's handshake proves the
"restart" loaded the new files. Standard library only: it runs as a script.

    python sim_tls_server.py --serve PORT:CERT:KEY:CLIENT_CA [--serve ...]

In-process: `server = start_server(port, cert, key, ca)`; `server.shutdown()`.
"""

from __future__ import annotations

import argparse
import errno
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import socket
from typing import Any

BIND_WAIT = 15.0  # the previous server may still hold the port for a moment


class _Handler(BaseHTTPRequestHandler):
    server_version = "sim-rke2/1"

    def setup(self) -> None:
        self.request.settimeout(10)
        self.request.do_handshake()  # in this thread, not in the accepting one
        super().setup()

    def do_GET(self) -> None:
        if self.path == "/health":
            body, kind = b'{"health":"true","reason":""}', "application/json"
        elif self.path in ("/readyz", "/healthz", "/livez"):
            body, kind = b"ok", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self.ctx = ctx
        super().__init__((host, port), _Handler)

    def get_request(self) -> tuple[socket, Any]:
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that fails the handshake is the client's problem


def context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=client_ca)
    return ctx


def bind(port: int, ctx: ssl.SSLContext) -> TLSServer:
    deadline = time.monotonic() + BIND_WAIT
    while True:
        try:
            return TLSServer(port, ctx)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_server(port: int, cert: str, key: str, client_ca: str) -> TLSServer:
    server = bind(port, context(cert, key, client_ca))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="append", required=True, metavar="PORT:CERT:KEY:CA")
    args = parser.parse_args(argv)
    for spec in args.serve:
        port, cert, key, ca = spec.split(":", 3)
        start_server(int(port), cert, key, ca)
    while True:  # SIGTERM's default action ends it at once, closing the ports
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
