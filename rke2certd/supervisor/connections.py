"""The kept-alive connections of one client of the endpoint (an agent's remote store).

An agent talks to its server every few seconds (a lease refresh every ttl/3, a long poll
after another, its main loop's reads). A new connection for each made a TLS handshake, a TCP
connection and a server thread per request: most of what an idle agent cost both sides. Here
an answered request leaves its connection open for the next one (HTTP/1.1 keep-alive; the
server keeps an authenticated connection open for KEEPALIVE_IDLE seconds, see http.py).

A connection is kept per (server, TLS context): a rotated CA bundle is another context, so a
request that must verify the server against the new bundle never rides on a session verified
against the old one. A kept connection is used by one request at a time (taken, then given
back); requests at once (the long poll, a refresh, the main loop) each take their own. At most
MAX_IDLE are kept per server and context, each at most CLIENT_IDLE seconds: less than the
server's idle limit, so a connection is rarely used just as the server closes it. One the server
closed anyway (its limit, a restart, room made for others) is found when it is taken (readable
at rest means the server's close) or when its request fails before any answer; the request is
then sent once more on a new connection (see client._exchange).
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
import time
from collections.abc import Callable

CLIENT_IDLE = 20.0  # seconds a connection is kept unused (the server keeps it 30)
MAX_IDLE = 2  # kept per server and context: the requests an agent makes at once, but its poll

Key = tuple[str, int, int]  # host, port, id of the TLS context


class Connections:
    """A client's kept connections; thread-safe. `monotonic` is injectable (tests)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._now = monotonic
        self._lock = threading.Lock()
        self._idle: dict[Key, list[tuple[http.client.HTTPSConnection, float]]] = {}
        self._closed = False

    def take(
        self, host: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> tuple[http.client.HTTPSConnection, bool]:
        """A connection to host:port (kept, else new) and whether it was kept; `timeout` is
        set on it either way."""
        key = (host, port, id(context))
        now = self._now()
        while True:
            with self._lock:
                kept = self._idle.get(key)
                conn, since = kept.pop() if kept else (None, 0.0)
            if conn is None:
                break
            if now - since <= CLIENT_IDLE and _at_rest(conn):
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.timeout = timeout
                return conn, True
            conn.close()  # too old, or the server closed it
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context), False

    def give(self, conn: http.client.HTTPSConnection, context: ssl.SSLContext) -> None:
        """A connection whose answer was read whole and that the server keeps open."""
        key = (conn.host, conn.port, id(context))
        with self._lock:
            if not self._closed:
                # keyed by the context's id: the connection holds its context, so that id is
                # not reused while it is kept
                kept = self._idle.setdefault(key, [])
                if len(kept) < MAX_IDLE:
                    kept.append((conn, self._now()))
                    return
        conn.close()

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Close every kept connection; later ones are closed when given back."""
        with self._lock:
            self._closed = True
            kept = [c for v in self._idle.values() for c, _ in v]
            self._idle.clear()
        for conn in kept:
            conn.close()


def _at_rest(conn: http.client.HTTPSConnection) -> bool:
    """Nothing to read on a connection at rest: readable means the server closed it (or sent
    what no request asked for); either way it is not to be used."""
    sock = conn.sock
    if sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()  # not select(): a fleet's process has fds beyond FD_SETSIZE
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
