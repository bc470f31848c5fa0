"""Long-lived etcd watch streams, for the cluster link.

Why not `Datastore.watch_prefix`: it returns after the first batch of events and closes its
stream (a bounded call, right for the CLI and the bootstrap wait), and the next call opens a new
TLS connection: a change cost every watching node a TLS handshake. Here a stream is read as
events come: a change costs each watching node one JSON line. A stream watches one key range
(etcd filters on the server): a server's link keeps two that never change, the structural keys
and its own wake key (rollout/link.py), so that a write reaches the few nodes it concerns, not
all, and no new stream is opened on a hand-off's path. SQLite keeps `watch_prefix` (its watch
is woken by the local file: every process wakes anyway).

The stream uses etcd's JSON gateway (`POST /v3/watch`) with the same TLS settings as the
datastore; it fails over between endpoints, and the caller resumes from its last revision, so
nothing is lost across a reconnect.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from rke2certd.datastore.base import (
    KV,
    DatastoreUnavailable,
    Event,
    EventType,
    WatchCompacted,
    key_bytes,
    key_str,
)
from rke2certd.datastore.etcd import is_read_timeout, parse_endpoints
from rke2certd.errors import DatastoreError

CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0  # no message for this long: reconnect (a half-dead TCP stream is found)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _event(item: dict[str, Any]) -> Event:
    kv = item["kv"]
    return Event(
        EventType(item.get("type", "PUT")),
        KV(
            key=key_str(base64.b64decode(kv["key"])),
            value=base64.b64decode(kv.get("value", "")),
            mod_revision=int(kv.get("mod_revision", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            lease=int(kv.get("lease", 0)) or None,
        ),
    )


class WatchStream:
    def __init__(
        self, endpoints: Sequence[str], session: requests.Session, key: str, end: str
    ) -> None:
        """Watch the keys in [key, end)."""
        self.endpoints = list(endpoints)
        self.session = session
        self.key, self.end = key, end
        self._preferred = 0
        self._resp: requests.Response | None = None
        self._lock = threading.Lock()
        self._closed = False

    def batches(self, start_revision: int) -> Iterator[list[Event]]:
        """Batches of changes from `start_revision` on, as they happen. Returns when the stream
        went quiet for IDLE_TIMEOUT or was closed (open it again from the next revision);
        raises WatchCompacted, or DatastoreUnavailable when no endpoint would stream."""
        create = {
            "key": _b64(key_bytes(self.key)),
            "range_end": _b64(key_bytes(self.end)),
            "start_revision": start_revision,
        }
        failures = []
        n = len(self.endpoints)
        for i in [(self._preferred + k) % n for k in range(n)]:
            url = self.endpoints[i] + "/v3/watch"
            try:
                resp = self.session.post(
                    url,
                    json={"create_request": create},
                    stream=True,
                    timeout=(CONNECT_TIMEOUT, IDLE_TIMEOUT),
                )
            except requests.RequestException as exc:
                failures.append(f"{self.endpoints[i]}: {type(exc).__name__}")
                continue
            with self._lock:
                if self._closed:
                    resp.close()
                    return
                self._resp = resp
            try:
                if resp.status_code != requests.codes.ok:
                    failures.append(f"{self.endpoints[i]}: HTTP {resp.status_code}")
                    continue
                self._preferred = i
                yield from self._read(resp, start_revision)
                return
            except requests.RequestException as exc:
                if _quiet(exc) or self._closed:
                    return
                raise DatastoreUnavailable(f"the watch stream from {url} broke: {exc}") from exc
            finally:
                with self._lock:
                    self._resp = None
                resp.close()
        raise DatastoreUnavailable("no etcd endpoint would open a watch: " + ", ".join(failures))

    def _read(self, resp: requests.Response, start_revision: int) -> Iterator[list[Event]]:
        for line in resp.iter_lines():
            if not line.strip():
                continue
            message = json.loads(line)
            if "error" in message:
                raise DatastoreUnavailable(f"etcd ended the watch: {message['error']}")
            result = message.get("result", {})
            if result.get("canceled"):
                compact = int(result.get("compact_revision", 0))
                if compact:
                    raise WatchCompacted(f"revision {start_revision} is compacted in etcd", compact)
                raise DatastoreError(f"etcd cancelled the watch: {result.get('cancel_reason')}")
            events = [_event(e) for e in result.get("events") or []]
            if events:
                yield events

    def close(self) -> None:
        """From another thread: end the stream now (the reader returns). Closing a socket does
        not wake a thread blocked reading it; shutting it down does."""
        with self._lock:
            self._closed = True
            resp = self._resp
        if resp is None:
            return
        conn = getattr(resp.raw, "connection", None)
        sock = getattr(conn, "sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        resp.close()


def _quiet(exc: BaseException) -> bool:
    """A read timeout: no message within IDLE_TIMEOUT (not a failure)."""
    return is_read_timeout(exc)


def open_stream(
    endpoint: str, cafile: Path, certfile: Path, keyfile: Path, key: str, end: str
) -> WatchStream | None:
    """A watch stream on [key, end) of the etcd at `endpoint` (the client cert only when both
    files exist); None for a store that is not etcd (SQLite)."""
    scheme = endpoint.strip().partition("://")[0].lower()
    if scheme not in ("http", "https"):
        return None
    session = requests.Session()
    session.trust_env = False  # as the datastore: the environment must not override verify
    session.verify = str(cafile)
    if certfile.exists() and keyfile.exists():
        session.cert = (str(certfile), str(keyfile))
    return WatchStream(parse_endpoints(endpoint), session, key, end)
