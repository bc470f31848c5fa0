"""A slow client, many times over: connections from one source address (any 127.0.0.0/8 address
on loopback) that finish their TLS handshake, or not, and then send a request a byte at a time.

Used by the endpoint's threat tests and by benchmarks/bench_supervisor.py. Nothing here times
anything: whether a connection is still open is asked of the socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

PARTIAL_REQUEST = b"GET /cacerts HTTP/1.1\r\nHost: rke2\r\n"
STREAM = PARTIAL_REQUEST + b"X-Pad: "


def _insecure() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Attacker:
    host: str
    port: int
    source: str
    conns: list[socket.socket] = field(default_factory=list)
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(
        self, count: int, *, tls: bool = True, settle: Callable[[], None] | None = None
    ) -> int:
        """Open `count` connections (TLS: handshake, then a partial request); how many the
        server let through the handshake (plain TCP: how many connected). `settle` runs after
        each connect (e.g. to wait until the server has taken it from its accept queue)."""
        context = _insecure()
        held = 0
        for _ in range(count):
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.settimeout(30)
            try:
                raw.bind((self.source, 0))
                raw.connect((self.host, self.port))
                if settle is not None:
                    settle()
                conn: socket.socket = raw
                if tls:
                    conn = context.wrap_socket(raw, server_hostname="rke2")
                    conn.sendall(PARTIAL_REQUEST[:1])
            except OSError:
                raw.close()
                self.refused += 1
                continue
            with self._lock:
                self.conns.append(conn)
            held += 1
        return held

    def trickle(self, interval: float) -> None:
        """From now on, one more byte of the request on every connection each `interval`."""

        def run() -> None:
            sent = 1
            while not self._stop.wait(interval):
                byte = PARTIAL_REQUEST[
                    sent % len(PARTIAL_REQUEST) : sent % len(PARTIAL_REQUEST) + 1
                ]
                sent += 1
                with self._lock:  # one thread at a time on a TLS socket
                    for conn in self.conns:
                        with contextlib.suppress(OSError):
                            conn.send(byte)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def still_open(self) -> int:
        """Connections the server has not closed (asked of each socket without blocking)."""
        with self._lock:
            return sum(1 for conn in self.conns if is_open(conn))

    def wait_all_closed(self, timeout: float) -> int:
        """Block (in select, no polling) until the server has closed every connection, or
        `timeout` passed without any news; how many are still open."""
        with selectors.DefaultSelector() as sel:
            with self._lock:
                for conn in self.conns:
                    sel.register(conn.fileno(), selectors.EVENT_READ, conn)
            pending = len(self.conns)
            while pending:
                ready = sel.select(timeout)
                if not ready:
                    break
                for key, _ in ready:
                    with self._lock:
                        still = is_open(key.data)  # drains what the server sent meanwhile
                    if not still:
                        sel.unregister(key.fileobj)
                        pending -= 1
            return pending

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for conn in self.conns:
                conn.close()
            self.conns.clear()


def is_open(conn: socket.socket) -> bool:
    """False once the peer closed or reset the connection. Reads (and drops) whatever the server
    sent before, such as TLS 1.3 session tickets, without blocking."""
    timeout = conn.gettimeout()
    conn.setblocking(False)
    try:
        while True:
            if not conn.recv(65536):
                return False
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            conn.settimeout(timeout)


def accept_queue(port: int) -> int:
    """Connections in the kernel's accept queue of the listener on `port` (ss's Recv-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[1])


def wait_accepted(port: int, timeout: float = 60.0) -> None:
    """Until the server has taken every connection from its accept queue (the kernel completes
    a handshake before the server accepts it: a connected client proves nothing)."""
    done = threading.Event()
    waited = 0.0
    while accept_queue(port) and waited < timeout:
        done.wait(0.005)  # ss cannot block on a queue: ask again shortly
        waited += 0.005
