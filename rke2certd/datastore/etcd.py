"""etcd v3 through its JSON gateway (etcd3gw), with fail-over between endpoints.

- TLS: one requests Session with `trust_env = False`. Otherwise REQUESTS_CA_BUNDLE or
  CURL_CA_BUNDLE in the environment silently replace `verify` (requests merges the environment
  over the session), and HTTP(S)_PROXY would route cluster traffic through a proxy.
- etcd3gw carries every call (URL, API path, HTTP status -> exception). Its kv helpers cannot
  compare on mod_revision nor return the header revision, so we post `txn`/`range` payloads
  through `Etcd3Client.transaction`/`post`; its watch has no timeout and a thread per watch, so
  `watch_prefix` reads `/v3/watch` through the same session with a read timeout.
- Fail-over: a call goes to the endpoint that last answered, then to the others; a round where
  no endpoint answers is retried with backoff (retry.py). Every call has a timeout.
- A write whose request went out but whose answer did not is "maybe applied". Writes are
  compare-and-swaps, so a retry can never apply twice; if the retry's compare fails, we cannot
  tell whose write won and raise OutcomeUnknown instead of returning False.
"""

from __future__ import annotations

import base64
import json
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from etcd3gw.lease import Lease
from urllib3.exceptions import NewConnectionError, ReadTimeoutError

from rke2certd.datastore.base import (
    KV,
    Datastore,
    DatastoreUnavailable,
    Event,
    EventType,
    LeaseNotFound,
    OutcomeUnknown,
    Snapshot,
    WatchCompacted,
    key_bytes,
    key_str,
    prefix_end,
)
from rke2certd.datastore.retry import retry
from rke2certd.errors import ConfigError, DatastoreError, DatastoreFilesMissing

T = TypeVar("T")
DEFAULT_PORT = 2379
# gRPC codes worth another endpoint or a retry: UNAVAILABLE (no leader, leader changed,
# member stopping) and DEADLINE_EXCEEDED (request timed out inside etcd).
_TRANSIENT_GRPC = {4, 14}
_GRPC_NOT_FOUND = 5


@dataclass
class _Call:
    """What one logical call learnt across endpoints and retries."""

    maybe_applied: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, reason)


@dataclass(frozen=True)
class _Failure:
    reason: str
    sent: bool  # the request may have reached etcd
    transient: bool  # a pause or another endpoint may cure it


def parse_endpoints(endpoint: str) -> list[str]:
    """`https://a:2379,https://b:2379` -> normalised base URLs (default port 2379)."""
    urls = []
    for item in (part.strip() for part in endpoint.split(",")):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "datastore-endpoint is not usable",
                [f"'{redact(item)}' is not an http(s)://host[:port] etcd endpoint"],
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        urls.append(f"{parts.scheme}://{host}:{parts.port or DEFAULT_PORT}")
    return urls


def redact(url: str) -> str:
    """Drop any user:password@ from a URL, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _session(cafile: Path | None, certfile: Path | None, keyfile: Path | None) -> requests.Session:
    if (certfile is None) != (keyfile is None):
        raise ConfigError(
            "datastore TLS settings are incomplete",
            ["datastore-certfile and datastore-keyfile must be given together"],
        )
    missing = [
        f"{name} {path} does not exist"
        for name, path in (
            ("datastore-cafile", cafile),
            ("datastore-certfile", certfile),
            ("datastore-keyfile", keyfile),
        )
        if path is not None and not path.is_file()
    ]
    if missing:
        raise DatastoreFilesMissing("datastore TLS files are missing", missing)
    session = requests.Session()
    session.trust_env = False  # see the module doc: the environment must not override verify
    session.verify = str(cafile) if cafile else True
    if certfile and keyfile:
        session.cert = (str(certfile), str(keyfile))
    return session


class EtcdDatastore(Datastore):
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        cafile: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff_base: float = 0.2,
        backoff_cap: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.endpoints = [u for e in endpoints for u in parse_endpoints(e)]
        self.location = "etcd at " + ",".join(self.endpoints)
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = (backoff_base, backoff_cap)
        self._sleep = sleep
        self._rng = rng
        self._session = _session(cafile, certfile, keyfile)
        self._clients = [self._client(url) for url in self.endpoints]
        self._preferred = 0

    def _client(self, url: str) -> Etcd3Client:
        parts = urlsplit(url)
        assert parts.hostname is not None
        return Etcd3Client(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            protocol=parts.scheme,
            timeout=self._timeout,
            api_path="/v3/",  # etcd >= 3.4; saves a /version round trip per endpoint
            session=self._session,
        )

    def close(self) -> None:
        self._session.close()

    # -- calls with fail-over ------------------------------------------------------------------

    def _call(self, op: Callable[[Etcd3Client], T], call: _Call | None = None) -> T:
        call = call or _Call()
        return retry(
            lambda: self._round(op, call),
            self._attempts,
            *self._backoff,
            sleep=self._sleep,
            rng=self._rng,
        )

    def _round(self, op: Callable[[Etcd3Client], T], call: _Call) -> T:
        """Try every endpoint once, the last one that answered first."""
        n = len(self._clients)
        transient = False
        for i in [(self._preferred + k) % n for k in range(n)]:
            try:
                result = op(self._clients[i])
            except (Etcd3Exception, requests.RequestException) as exc:
                failure = _classify(exc)
                call.maybe_applied |= failure.sent
                call.failures.append((self.endpoints[i], failure.reason))
                transient |= failure.transient
                continue
            self._preferred = i
            return result
        message = self._unreachable(call.failures[-n:])
        # TLS failures do not heal by waiting: raise a non-retried error at once.
        raise DatastoreUnavailable(message) if transient else DatastoreError(message)

    def _unreachable(self, failures: list[tuple[str, str]]) -> str:
        return (
            f"cannot reach the datastore at {','.join(self.endpoints)}: {_reasons(failures)}; "
            "check that etcd is running and the certs in datastore-cafile/-certfile/-keyfile"
        )

    def ping(self) -> None:
        """One linearizable read of one key: an endpoint answers, trusts us, has a leader."""
        payload = {"key": _b64(b"/"), "count_only": True}
        self._call(lambda c: c.post(c.get_url("/kv/range"), json=payload))

    # -- keys ----------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        payload = {"key": _b64(key_bytes(key))}
        result = self._call(lambda c: c.post(c.get_url("/kv/range"), json=payload))
        kvs = result.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def snapshot(self, prefix: str) -> Snapshot:
        return self._read_range(_range(prefix))

    def snapshot_range(self, start: str, end: str) -> Snapshot:
        return self._read_range({"key": _b64(key_bytes(start)), "range_end": _b64(key_bytes(end))})

    def _read_range(self, payload: dict[str, Any]) -> Snapshot:
        result = self._call(lambda c: c.post(c.get_url("/kv/range"), json=payload))
        kvs = [_kv(item) for item in result.get("kvs") or []]
        return Snapshot(kvs, int(result["header"]["revision"]))

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        return self.compare_and_swap(key, value, 0, lease)

    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        compare = _mod_equals(_b64(key_bytes(key)), expected_mod_revision)
        return self._txn(key, compare, _put_op(key, value, lease)) is not None

    def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        txn = {"compare": [], "success": [_put_op(key, value, lease)], "failure": []}
        self._call(lambda c: c.transaction(txn), _Call())  # repeated after a lost answer: harmless

    def delete(self, key: str, expected_mod_revision: int | None = None) -> bool:
        k = _b64(key_bytes(key))
        compare = (
            {"key": k, "target": "MOD", "result": "GREATER", "mod_revision": 0}
            if expected_mod_revision is None
            else _mod_equals(k, expected_mod_revision)
        )
        result = self._txn(key, compare, {"request_delete_range": {"key": k}})
        if result is None:
            return False
        deleted = result["responses"][0]["response_delete_range"].get("deleted", 0)
        return int(deleted) > 0

    def _txn(
        self, key: str, compare: dict[str, Any], success: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Run one compare-and-do on `key`; the response if the compare held, else None."""
        call = _Call()
        txn = {"compare": [compare], "success": [success], "failure": []}
        result = dict(self._call(lambda c: c.transaction(txn), call))
        if result.get("succeeded"):
            return result
        if call.maybe_applied:
            raise OutcomeUnknown(
                f"the write to {key} may or may not have been applied "
                f"({_reasons(call.failures)}); read the key again"
            )
        return None

    # -- leases --------------------------------------------------------------------------------

    def grant_lease(self, ttl_seconds: int) -> int:
        if ttl_seconds < 1:
            raise ValueError("a lease TTL must be at least 1 second")
        # a grant retried after a lost answer leaves an unused lease behind, which just expires
        return int(self._call(lambda c: c.lease(ttl_seconds).id))

    def refresh_lease(self, lease_id: int) -> int:
        ttl = self._call(lambda c: Lease(lease_id, c).refresh())
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id} has expired or was revoked")
        return ttl

    def revoke_lease(self, lease_id: int) -> bool:
        try:
            return self._call(lambda c: Lease(lease_id, c).revoke())
        except LeaseNotFound:
            return False

    def lease_alive(self, lease_id: int) -> bool:
        # LeaseTimeToLive answers TTL -1 for a lease that expired, was revoked or never existed
        # (no error, unlike a refresh) and does not refresh it. A live lease in its last second
        # has TTL 0, which the JSON gateway leaves out.
        payload = {"ID": lease_id}
        result = self._call(lambda c: c.post(c.get_url("/lease/timetolive"), json=payload))
        return int(result.get("TTL", 0)) >= 0

    # -- watch -----------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        create = _range(prefix, start_revision=start_revision)
        return self._call(lambda c: self._watch_once(c, create, max(timeout, 0.01)))

    def _watch_once(
        self, client: Etcd3Client, create: dict[str, Any], timeout: float
    ) -> list[Event]:
        """Open a watch stream, return its first events, or [] if none come within `timeout`."""
        resp = self._session.post(
            client.get_url("/watch"),
            json={"create_request": create},
            stream=True,
            timeout=(self._timeout, timeout),  # (connect, wait between stream messages)
        )
        created = False
        try:
            if resp.status_code != requests.codes.ok:
                raise Etcd3Exception(resp.text, resp.reason)
            for result in _stream_results(resp.iter_lines()):
                _check_watch(result, create["start_revision"])
                created = True
                if result.get("events"):
                    return [_event(e) for e in result["events"]]
        except requests.RequestException as exc:
            if created and is_read_timeout(exc):  # the stream is open and quiet: no change
                return []
            raise
        finally:
            resp.close()
        raise DatastoreUnavailable(f"{client.base_url} closed the watch stream")


def _reasons(failures: list[tuple[str, str]]) -> str:
    """`reason` alone when every endpoint failed alike, else `endpoint: reason, ...`."""
    if len({reason for _, reason in failures}) == 1:
        return failures[0][1]
    return ", ".join(f"{endpoint}: {reason}" for endpoint, reason in failures)


# -- JSON helpers ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _range(prefix: str, **extra: Any) -> dict[str, Any]:
    raw = key_bytes(prefix)
    return {"key": _b64(raw), "range_end": _b64(prefix_end(raw)), **extra}


def _put_op(key: str, value: bytes, lease: int | None) -> dict[str, Any]:
    """A transaction's put of `key` (the lease detached when None, as a plain put does)."""
    put: dict[str, Any] = {"key": _b64(key_bytes(key)), "value": _b64(value)}
    if lease is not None:
        put["lease"] = lease
    return {"request_put": put}


def _mod_equals(key_b64: str, revision: int) -> dict[str, Any]:
    return {"key": key_b64, "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def _kv(item: dict[str, Any]) -> KV:
    lease = int(item.get("lease", 0))
    return KV(
        key=key_str(base64.b64decode(item["key"])),
        value=base64.b64decode(item.get("value", "")),
        mod_revision=int(item.get("mod_revision", 0)),
        create_revision=int(item.get("create_revision", 0)),
        lease=lease or None,
    )


def _event(item: dict[str, Any]) -> Event:
    return Event(EventType(item.get("type", "PUT")), _kv(item["kv"]))


def _stream_results(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        message = json.loads(line)
        if "error" in message:  # {"error": {"grpc_code": 14, "message": ...}}
            error = message["error"]
            body = {"code": error.get("grpc_code"), "message": error.get("message")}
            raise Etcd3Exception(json.dumps(body), "watch error")
        yield message["result"]


def _check_watch(result: dict[str, Any], start_revision: int) -> None:
    if not result.get("canceled"):
        return
    compact = int(result.get("compact_revision", 0))
    if compact:
        raise WatchCompacted(
            f"revision {start_revision} is compacted in etcd (history starts at {compact}); "
            "read the keys again",
            compact,
        )
    raise DatastoreError(f"etcd cancelled the watch: {result.get('cancel_reason', 'no reason')}")


# -- failure classification ----------------------------------------------------------------------


def _classify(exc: Etcd3Exception | requests.RequestException) -> _Failure:
    """Decide from an exception whether the request went out and whether to try again.

    etcd3gw re-raises transport errors as its own exceptions inside its `except` block, so the
    requests exception is the __context__; an Etcd3Exception without one is an HTTP error reply.
    """
    transport = exc if isinstance(exc, requests.RequestException) else exc.__context__
    if isinstance(transport, requests.RequestException):
        return _transport_failure(transport)
    assert isinstance(exc, Etcd3Exception)
    return _reply_failure(exc)


def _transport_failure(exc: requests.RequestException) -> _Failure:
    tls = _tls_refusal(exc)
    if tls:  # the handshake failed: nothing was sent, and waiting will not help
        return _Failure(tls, sent=False, transient=False)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return _Failure("connection timed out", sent=False, transient=True)
    if is_read_timeout(exc):
        return _Failure("no answer in time", sent=True, transient=True)
    if any(isinstance(e, NewConnectionError | ConnectionRefusedError) for e in _causes(exc)):
        return _Failure(_os_reason(exc) or "connection refused", sent=False, transient=True)
    # reset, closed or TLS EOF mid-request: the request may have been applied
    return _Failure(_os_reason(exc) or type(exc).__name__, sent=True, transient=True)


def _reply_failure(exc: Etcd3Exception) -> _Failure:
    try:
        body = json.loads(exc.detail_text or "")
    except ValueError:
        body = {}
    code = body.get("code") if isinstance(body, dict) else None
    message = (body.get("message") or body.get("error")) if isinstance(body, dict) else None
    message = message or exc.detail_text or str(exc)
    if code == _GRPC_NOT_FOUND and "lease not found" in message:
        raise LeaseNotFound(f"{message}: the lease expired or was revoked")
    # etcd3gw maps HTTP 503/504/408 to these two, whatever the body says
    if code in _TRANSIENT_GRPC or isinstance(exc, ConnectionFailedError | ConnectionTimeoutError):
        return _Failure(message, sent=True, transient=True)
    raise DatastoreError(f"etcd refused the request: {message}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything wrapped in it (requests -> urllib3 -> ssl/socket)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [*e.args, getattr(e, "reason", None), e.__cause__, e.__context__]
        todo.extend(x for x in inner if isinstance(x, BaseException))


def is_read_timeout(exc: BaseException) -> bool:
    return any(
        isinstance(e, ReadTimeoutError | requests.exceptions.ReadTimeout) for e in _causes(exc)
    )


def _os_reason(exc: BaseException) -> str | None:
    for e in _causes(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    return None


# A connection cut in the middle of a TLS stream: not a refusal, the request may have gone out.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _tls_refusal(exc: BaseException) -> str | None:
    """Why TLS refused the connection (untrusted server, rejected client cert, not TLS), or
    None when the failure is not a TLS refusal."""
    causes = list(_causes(exc))
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"server certificate not trusted ({e.verify_message})"
    for e in causes:
        if isinstance(e, ssl.SSLError) and not isinstance(e, _TLS_CUT):
            return f"TLS handshake failed ({e.reason or e})"
    return None
