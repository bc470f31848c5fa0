"""The agent side of the endpoint: fetch `/cacerts` pinned by the join token, then ask for certs.

Pinning (docs/RKE2-COMPATIBILITY.md §7). The first request is an unauthenticated `GET /cacerts`
over TLS with verification off, as RKE2 agents do (the CA is not known yet); it carries no
credential. The bundle's CA hash must equal the token's. Only then is a credential sent, and only on
connections whose server certificate verifies against that bundle.

Verification after pinning: the chain must end in the pinned bundle (each of its certs is a
trust anchor, partial chains allowed); the host name is not checked. The bundle is private to
the cluster and pinned by hash, so a name check adds no protection (whoever holds the CA key
can mint any name), and it would break servers reached through a VIP or load-balancer name
missing from their SANs, which RKE2's own supervisor (dynamic SANs) accepts.

Fail-over: `urls` is a URL, a comma list or a sequence; each is tried in order. A server that
cannot be reached, answers 5xx, or whose CA does not match (during a CA rotation some servers
may still serve the old CA) is skipped; a 4xx is final, since another server would answer the
same. When none answered, the error names every server and why. The stdlib client is used:
requests would honour REQUESTS_CA_BUNDLE from the environment over our pinned bundle.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rke2certd.constants import SUPERVISOR_PORT
from rke2certd.errors import PKIError, Rke2certdError, TokenError
from rke2certd.log import log
from rke2certd.pki.join_token import SERVER_USER, Token, ca_hash, parse_token
from rke2certd.supervisor import (
    AGENT_USER,
    CACERTS_PATH,
    CLIENT_CA_PATH,
    MAX_JSON_DEPTH,
    NODE_IP_HEADER,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    cert_route,
    wire,
)
from rke2certd.supervisor.connections import Connections

DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE = 1024 * 1024  # CA bundles and leaf chains are a few KiB
# the coordination keys of a large fleet: ~1 KiB per agent when read whole (records.py)
MAX_JSON_RESPONSE = 64 * 1024 * 1024
# how a kept connection fails when the server closed it at rest (nothing was answered)
_CLOSED_AT_REST = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)
Urls = str | Sequence[str]
_T = TypeVar("_T")


class SupervisorError(Rke2certdError):
    """The server endpoint could not be used."""


class UnreachableError(SupervisorError):
    """No server answered usefully (connection, TLS, 5xx)."""


class RefusedError(SupervisorError):
    """A server refused the request (4xx); `status` is the HTTP status, `code` the server's
    machine-readable reason when it gave one (wire.py's error codes)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Skip(Exception):
    """This server did not answer usefully; try the next."""


class _Mismatch(Exception):
    def __init__(self, error: TokenError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    body: bytes
    code: str | None = None  # the ERROR_HEADER of a refusal


# URLs and TLS contexts -----------------------------------------------------------------------


def split_urls(urls: Urls) -> list[str]:
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in items if u.strip()]
    if not out:
        raise SupervisorError("no server URL given; set `server` to the RKE2 server URL")
    return out


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or SUPERVISOR_PORT
    except ValueError:
        raise SupervisorError(f"{url}: the port is not a number") from None
    if parts.scheme != "https" or not parts.hostname:
        raise SupervisorError(f"{url} is not an https:// URL with a host")
    return parts.hostname, port


def insecure_context() -> ssl.SSLContext:
    """For the one unauthenticated GET /cacerts, before the CA is known."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pinned_context(cacerts: bytes) -> ssl.SSLContext:
    """Verify the server against `cacerts` only (no system CAs, no host name; see module doc).

    One context per bundle, shared: building one parses every CA of the bundle, which was
    most of an agent's CPU per request (a lease refresh every ttl/3, a long poll, each
    rollout step). A context is never changed after it is built, and OpenSSL contexts may be
    shared between threads; a bundle that changes (a rotation) is another key."""
    return _pinned(bytes(cacerts))


@functools.lru_cache(maxsize=8)  # the current bundle and the one before, with room to spare
def _pinned(cacerts: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        context.load_verify_locations(cadata=cacerts.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise SupervisorError(f"the pinned CA bundle is unusable: {exc}") from exc
    return context


# One exchange, and fail-over ---------------------------------------------------------------


def _exchange(
    url: str,
    context: ssl.SSLContext,
    method: str,
    path: str,
    timeout: float,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    limit: int = MAX_RESPONSE,
    pool: Connections | None = None,
) -> _Answer:
    """One request and its answer. With `pool`, on a kept connection when there is one, left
    open for the next request when the server keeps it; a kept connection the server closed
    before answering (its idle limit, a restart) is replaced by a new one and the request sent
    again, once: as a fail-over to another server would, it may repeat a request whose answer
    was lost (every operation of the endpoint is conditional, or harmless twice)."""
    host, port = _endpoint(url)
    sent = dict(headers or {})
    if pool is None:
        sent["Connection"] = "close"  # one request: the server need not keep a thread for more
    for _attempt in range(2):
        conn, kept = (
            pool.take(host, port, context, timeout)
            if pool is not None
            else (http.client.HTTPSConnection(host, port, timeout=timeout, context=context), False)
        )
        keep = False
        try:
            try:
                conn.request(method, path, body=body, headers=sent)
                response = conn.getresponse()
            except _CLOSED_AT_REST:
                if kept:
                    continue  # closed by the server while kept: once more, on a new connection
                raise
            data = response.read(limit + 1)
            keep = pool is not None and not response.will_close and response.isclosed()
        except ssl.SSLCertVerificationError as exc:
            raise _Skip(
                f"its certificate does not verify against the pinned CA ({exc.reason})"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Skip(_why(exc)) from exc
        finally:
            if keep and pool is not None:
                pool.give(conn, context)
            else:
                conn.close()
        if len(data) > limit:
            raise _Skip(f"it answered more than {limit} bytes")
        code = response.getheader(wire.ERROR_HEADER)
        return _Answer(response.status, response.reason, data, code)
    raise _Skip("it closed two connections in a row before answering")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _expect_ok(url: str, answer: _Answer, what: str) -> bytes:
    if answer.status == 200:
        return answer.body
    text = answer.body.decode(errors="replace").strip().splitlines()
    detail = text[0][:200] if text else answer.reason
    if answer.status >= 500:
        raise _Skip(f"it answered {answer.status} to {what}: {detail}")
    if answer.status == 403 and "node password" in detail:
        message = (
            f"the server at {url} refused this node's name for {what} (403: {detail}); "
            "the node password file (node-password-file) does not match the one this node "
            "name was first registered with"
        )
    elif answer.status == 401:
        message = (
            f"the server at {url} refused the token for {what} (401: {detail}); the token's "
            "password is not this cluster's: set `token` to the server's current agent token "
            "(<data>/server/agent-token on a server)"
        )
    else:
        message = f"the server at {url} refused {what}: {answer.status} {detail}"
    raise RefusedError(message, answer.status, answer.code)


def _failover(urls: Urls, attempt: Callable[[str], _T], what: str) -> _T:
    targets = split_urls(urls)
    problems: list[str] = []
    mismatch: TokenError | None = None
    for url in targets:
        try:
            return attempt(url)
        except _Skip as skip:
            problems.append(f"{url}: {skip}")
            log.warning("server_skipped", server_url=url, reason=f"{what}: {skip}")
        except _Mismatch as bad:
            mismatch = mismatch or bad.error
            problems.append(f"{url}: its CA does not match the token")
    if mismatch is not None:
        others = [p for p in problems if not p.endswith("does not match the token")]
        suffix = f" (other servers: {'; '.join(others)})" if others else ""
        raise TokenError(f"{mismatch}{suffix}")
    raise UnreachableError(
        f"cannot reach the server at {', '.join(targets)} for {what}: {'; '.join(problems)}"
    )


def _auth_headers(token: Token) -> dict[str, str]:
    user = token.username or AGENT_USER  # a bare password is the node user's, as in RKE2
    raw = f"{user}:{token.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def _password_header(node_password: str | None) -> dict[str, str]:
    return {NODE_PASSWORD_HEADER: node_password} if node_password else {}


# Public API --------------------------------------------------------------------------------


def _mismatch(url: str, wanted: str, got: str) -> TokenError:
    return TokenError(
        f"the CA of the server at {url} does not match the join token: the token pins CA hash "
        f"{wanted}, the server's CA hash is {got}. No credential was sent. The token is out of "
        "date (were the CAs rotated?) or belongs to another cluster: set `token` (or the file "
        "named by `token-file`) to the server's current agent token, the content of "
        "<data>/server/agent-token on a server"
    )


def fetch_cacerts(urls: Urls, token: str, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The server CA bundle, checked against the token's CA hash before anything is sent."""
    return locate_cacerts(urls, token, timeout=timeout)[1]


def _get_cacerts(url: str, context: ssl.SSLContext, timeout: float) -> tuple[bytes, str]:
    """One server's `/cacerts` answer and its CA hash (a server answering something else is
    skipped)."""
    answer = _exchange(url, context, "GET", CACERTS_PATH, timeout)
    bundle = _expect_ok(url, answer, f"GET {CACERTS_PATH}")
    try:
        return bundle, ca_hash(bundle, source=f"the {CACERTS_PATH} answer of {url}")
    except PKIError as exc:
        raise _Skip(f"its {CACERTS_PATH} answer is not a CA bundle ({exc})") from exc


def locate_cacerts(
    urls: Urls, token: str, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str, bytes]:
    """As fetch_cacerts, also naming the server that answered, so that a caller can ask it
    first: during a CA rotation other servers may sign with a CA the token does not pin."""
    parsed = parse_token(token)

    def attempt(url: str) -> tuple[str, bytes]:
        bundle, got = _get_cacerts(url, insecure_context(), timeout)
        if parsed.ca_hash is None:
            log.warning(
                "ca_not_pinned",
                server_url=url,
                ca_hash=got,
                reason="the token has no CA hash: the CA is trusted as served",
            )
        elif got != parsed.ca_hash:
            raise _Mismatch(_mismatch(url, parsed.ca_hash, got))
        else:
            log.debug("ca_pinned", server_url=url, ca_hash=got)
        return url, bundle

    return _failover(urls, attempt, f"GET {CACERTS_PATH}")


def fetch_cacerts_trusted(
    urls: Urls, trusted: bytes, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str, bytes, str]:
    """`/cacerts` from a server whose certificate verifies against `trusted` (the CA bundle an
    agent already holds), whatever its hash: how an agent learns a rotated CA from a server
    that proves itself with the CA it knows. No credential is sent. Returns the server, the
    bundle and its CA hash."""
    context = pinned_context(trusted)

    def attempt(url: str) -> tuple[str, bytes, str]:
        return url, *_get_cacerts(url, context, timeout)

    return _failover(urls, attempt, f"GET {CACERTS_PATH} (trusted by the CA on disk)")


def _get(
    urls: Urls,
    token: str,
    cacerts: bytes,
    path: str,
    timeout: float,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    headers = {**_auth_headers(parse_token(token)), **(extra or {})}
    context = pinned_context(cacerts)

    def attempt(url: str) -> bytes:
        answer = _exchange(url, context, "GET", path, timeout, headers=headers)
        return _expect_ok(url, answer, f"GET {path}")

    return _failover(urls, attempt, f"GET {path}")


def request_cert(
    urls: Urls,
    token: str,
    cacerts: bytes,
    route: str,
    csr_der: bytes,
    node_name: str,
    node_ips: Sequence[str],
    *,
    node_password: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """POST a DER CSR; returns the server's answer: the leaf PEM followed by its CA bundle.

    `route` is a path (`/v1-rke2/client-kubelet.crt`) or a leaf name (`client-kubelet`).
    `node_password` proves `node_name` (the kubelet routes need it).
    """
    path = route if route.startswith("/") else cert_route(route.removesuffix(".crt"))
    headers = {
        **_auth_headers(parse_token(token)),
        "Content-Type": "application/octet-stream",
        NODE_NAME_HEADER: node_name,
        NODE_IP_HEADER: ",".join(node_ips),
        **_password_header(node_password),
    }
    context = pinned_context(cacerts)

    def attempt(url: str) -> bytes:
        answer = _exchange(url, context, "POST", path, timeout, body=csr_der, headers=headers)
        return _expect_ok(url, answer, f"POST {path}")

    return _failover(urls, attempt, f"POST {path}")


def post_json(
    urls: Urls,
    token: str,
    cacerts: bytes,
    path: str,
    doc: Mapping[str, Any],
    node_name: str,
    *,
    node_password: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pool: Connections | None = None,
) -> dict[str, Any]:
    """POST a JSON document over the pinned channel, as `node_name` proved by `node_password`;
    the JSON object answered (nesting bounded: a server's answer is not trusted to be sane).
    `pool`: the caller's kept connections (connections.py), else one connection for it."""
    body = json.dumps(doc).encode()
    headers = {
        **_auth_headers(parse_token(token)),
        "Content-Type": "application/json",
        NODE_NAME_HEADER: node_name,
        **_password_header(node_password),
    }
    context = pinned_context(cacerts)

    def attempt(url: str) -> dict[str, Any]:
        answer = _exchange(
            url,
            context,
            "POST",
            path,
            timeout,
            body=body,
            headers=headers,
            limit=MAX_JSON_RESPONSE,
            pool=pool,
        )
        data = _expect_ok(url, answer, f"POST {path}")
        try:
            out = wire.loads(data, MAX_JSON_DEPTH)
        except wire.WireError as exc:
            raise _Skip(f"its answer to POST {path} is not usable JSON: {exc}") from None
        if not isinstance(out, dict):
            raise _Skip(f"its answer to POST {path} is not a JSON object")
        return out

    return _failover(urls, attempt, f"POST {path}")


def fetch_client_ca(
    urls: Urls, token: str, cacerts: bytes, *, timeout: float = DEFAULT_TIMEOUT
) -> bytes:
    """The client CA bundle (`server/tls/client-ca.crt` of the server), over a pinned channel."""
    return _get(urls, token, cacerts, CLIENT_CA_PATH, timeout)


def get_as_server(urls: Urls, token: str, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """GET `path` from a server's RKE2 supervisor as a joining server does: `/cacerts` pinned
    by the token's CA hash first, then the request with `server:<password>` over a channel
    verified against that bundle (RKE2's server-only routes: `/db/info`, server-bootstrap)."""
    parsed = parse_token(token)
    server, bundle = locate_cacerts(urls, token, timeout=timeout)
    raw = f"{SERVER_USER}:{parsed.password}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    context = pinned_context(bundle)

    def attempt(url: str) -> bytes:
        answer = _exchange(url, context, "GET", path, timeout, headers=headers)
        return _expect_ok(url, answer, f"GET {path}")

    return _failover([server], attempt, f"GET {path}")
