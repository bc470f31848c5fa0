"""The endpoint's HTTP plumbing: the accept loop, a thread per connection.

Checks run in order route (404), method (405), credentials (401/403), headers, body length
(411/413), then the body is read; the first four also answer `Expect: 100-continue`, so a
refused client never sends its body. Then the route's handler (routes.py) runs. Every refusal
is logged (`request_refused`) without credentials.

Limits (`limits.py`, constants in `rke2certd.supervisor`): a deadline for handshake, headers and
body together; unauthenticated connections capped in total and per source address, so that
authenticated agents keep places of their own; JSON nesting bounded (wire.loads).

Kept-alive connections. A connection whose request showed a valid credential and was answered
200 stays open for the next request (HTTP/1.1), unless its client said `Connection: close`:
an agent's lease refreshes and long polls then cost no TLS handshake and no new thread each.
Between requests it rests up to KEEPALIVE_IDLE seconds, and the gate may close it to make room
(limits.py). Anything else (a refusal, an unauthenticated request such as `/cacerts`) closes
it: a connection never goes on with a client that has not shown a credential.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from rke2certd.log import log, notify
from rke2certd.supervisor import LISTEN_BACKLOG, MAX_CSR_BYTES, wire
from rke2certd.supervisor.admission import authenticate, body_length
from rke2certd.supervisor.limits import ConnectionGate, Refusal, Ticket
from rke2certd.supervisor.request import Caller, Refused, clip
from rke2certd.supervisor.routes import ROUTES, Answer, Request, Route, Services

IO_TIMEOUT = 15.0  # per socket operation: a stalled client must not hold a thread forever
# a kept connection's rest between requests: longer than an agent's lease refresh period
# (ttl/3, 10 s by default), so that its refreshes reuse it (its client keeps it 20 s)
KEEPALIVE_IDLE = 30.0
LINGER_SECONDS = 1.0
FLOOD_LOG_SECONDS = 1.0


def _linger_close(conn: socket.socket) -> None:
    """Half-close, then drop what the client already sent (at most MAX_CSR_BYTES + 1 bytes, for
    at most LINGER_SECONDS): closing a socket with unread data sends a TCP reset, which can
    destroy our answer before the client reads it."""
    try:
        conn.shutdown(socket.SHUT_WR)  # an SSLSocket drops TLS here: what follows is raw bytes
        deadline, left = time.monotonic() + LINGER_SECONDS, MAX_CSR_BYTES + 1
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            conn.settimeout(remaining)
            chunk = conn.recv(min(left, 16384))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], services: Services, gate: ConnectionGate) -> None:
        self.services, self.gate = services, gate
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._lock = threading.Lock()
        self._local = threading.local()  # the connection's ticket, for its handler
        self._flood: dict[str, tuple[float, int]] = {}  # event -> (last logged, not logged since)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can block on DNS; not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    # the accept loop: sleeps in select() until a client or stop() comes (no polling)

    def serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._stopping:
                        self._accept()

    def _accept(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # the client gave up before accept()
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def server_close(self) -> None:
        super().server_close()
        self.gate.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # connections: a thread each, TLS handshake in it, admitted and timed by the gate

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        ticket = self.gate.admit(address, request)
        if isinstance(ticket, Refusal):
            self._flood_log("connection_refused", address, ticket.reason)
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._connection, args=(request, client_address, ticket), daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: drop this one, keep serving
            self.gate.release(ticket)
            self.shutdown_request(request)

    def _connection(self, request: socket.socket, client_address: Any, ticket: Ticket) -> None:
        conn: socket.socket | None = None
        address = str(client_address[0])
        try:
            request.settimeout(IO_TIMEOUT)
            # The TLS socket takes over the fd: the gate must hold it before the handshake,
            # which the deadline covers too.
            conn = self.services.tls.current().context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            if not self.gate.rebind(ticket, conn):
                return
            try:
                conn.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("tls_handshake_failed", remote_addr=address, reason=str(exc))
                return
            self._local.ticket = ticket
            _Handler(conn, client_address, self)
        except OSError as exc:  # the client went away, or was cut (ticket.why, logged below)
            if not ticket.why:
                reason = f"{type(exc).__name__}: {exc}"
                log.debug("connection_lost", remote_addr=address, reason=reason)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if ticket.why and not ticket.quiet:
                self._flood_log("connection_cut", address, ticket.why)
            self.gate.release(ticket)  # before the fd is closed (see ConnectionGate.release)
            self._local.ticket = None
            if conn is not None:
                conn.close()
            self.shutdown_request(request)

    def _flood_log(self, event: str, address: str, reason: str) -> None:
        """At most one warning per event a second: a flood of connections is one line a second
        (with how many more there were), not one per connection."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._flood.get(event, (-FLOOD_LOG_SECONDS, 0))
            if now - last < FLOOD_LOG_SECONDS:
                self._flood[event] = (last, skipped + 1)
                return
            self._flood[event] = (now, 0)
        log.warning(event, remote_addr=address, reason=reason, not_logged_before=skipped)

    def was_cut(self) -> bool:
        """This thread's connection was cut (its deadline passed, or it made room)."""
        ticket = getattr(self._local, "ticket", None)
        return ticket is not None and bool(ticket.why)

    def promote(self) -> None:
        """This thread's connection showed a valid credential (see limits.py)."""
        ticket = getattr(self._local, "ticket", None)
        if ticket is not None:
            self.gate.promote(ticket)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def rest(self) -> bool:
        """This thread's connection waits for its next request; False: close it instead."""
        ticket = getattr(self._local, "ticket", None)
        return ticket is not None and not self._stopping and self.gate.rest(ticket)

    def wake(self) -> bool:
        """This thread's connection's next request came; False: it was cut meanwhile."""
        ticket = getattr(self._local, "ticket", None)
        return ticket is not None and self.gate.wake(ticket)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        reason = f"{type(exc).__name__}: {exc}"
        log.error("supervisor_request_failed", remote_addr=str(client_address[0]), reason=reason)


class _Handler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"
    server_version = "rke2certd"
    timeout = IO_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    _linger = False  # set when an answer leaves the request body unread
    _kept = False  # a request was answered and the connection kept for the next one

    def version_string(self) -> str:
        return self.server_version

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _linger_close(self.connection)

    def handle_one_request(self) -> None:
        if self._kept and not self._next_request():
            self.close_connection = True
            return
        super().handle_one_request()

    def _next_request(self) -> bool:
        """Rest until the next request's first byte: False at the client's close, an error,
        KEEPALIVE_IDLE without one, or the gate's cut (made room, the endpoint stops)."""
        if not self.server.rest():
            return False
        try:
            self.connection.settimeout(KEEPALIVE_IDLE)
            first = self.rfile.peek(1)  # type: ignore[attr-defined]  # a BufferedReader
        except (OSError, ValueError):  # timed out, reset, TLS alert; ValueError: closed
            first = b""
        finally:
            woken = self.server.wake()
        if not first or not woken:
            return False
        self.connection.settimeout(IO_TIMEOUT)
        return True

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends its body (curl asks for large bodies).
        try:
            self._admit()
        except Refused as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        # the client's wish (`Connection: close`, HTTP/1.0), as the request line and headers
        # said; closed unless the request is served as an authenticated one
        wants_close, self.close_connection = self.close_connection, True
        if self.server.was_cut():
            return  # what was read before the cut is no request: nothing to answer
        try:
            route, caller, length = self._admit()
            body = self._read_body(length) if length else b""
            if caller is not None:
                self.server.promote()  # a valid credential and a whole request: no deadline
            request = Request(self._path, caller, self.headers, body, self.server.services)
            answer = route.handler(request)
            keep = caller is not None and not wants_close and not self.server.stopping
            self._send(answer, keep)
            self.close_connection = not keep
            self._kept = keep
        except Refused as refusal:
            self._refuse(refusal)

    @property
    def _path(self) -> str:
        return urlsplit(self.path).path

    def _admit(self) -> tuple[Route, Caller | None, int]:
        route = ROUTES.get(self._path)
        if route is None:
            raise Refused(404, "no such route")
        if self.command != route.method:
            raise Refused(405, f"use {route.method}", {"Allow": route.method})
        caller = None
        if route.role:
            address = str(self.client_address[0])
            caller = authenticate(self.server.services.node, route.role, self.headers, address)
        length = body_length(self.headers) if route.method != "GET" else 0
        return route, caller, length

    def _read_body(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length)  # length <= MAX_CSR_BYTES, checked in _admit
        except TimeoutError:
            raise Refused(408, "timed out reading the body") from None
        except OSError:
            raise Refused(400, "the connection ended before the body") from None
        if len(body) != length:
            raise Refused(400, "the body is shorter than its Content-Length")
        return body

    def _send(self, answer: Answer, keep: bool) -> None:
        notify("request_served", http_path=self._path, http_status=200)  # the metrics
        self.send_response(200)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        if not keep:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def _refuse(self, refusal: Refused) -> None:
        emit = log.warning if refusal.status in (400, 401, 403, 413) else log.info
        emit(
            "request_refused",
            http_status=refusal.status,
            http_method=clip(self.command or ""),
            http_path=clip(self._path),
            reason=refusal.reason,
            remote_addr=str(self.client_address[0]),
        )
        body = (refusal.reason + "\n").encode()
        self.close_connection = True  # the body may be unread: never parse it as a request
        self._linger = True
        self.send_response(refusal.status)
        for name, value in refusal.headers.items():
            self.send_header(name, value)
        if refusal.code is not None:
            self.send_header(wire.ERROR_HEADER, refusal.code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own events say more, and never include headers

    def log_error(self, format: str, *args: Any) -> None:
        # The stdlib's own refusals (bad request line, unsupported method...).
        reason = clip(format % args)
        log.info("request_refused", reason=reason, remote_addr=str(self.client_address[0]))
