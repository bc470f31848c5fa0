"""Who may use a route, and with what body: the checks a request passes before it is served.

Authentication is basic auth, compared in constant time with the passwords of the server's
tokens. Their files are stat'ed at each request and read again when they changed (inode, size,
mtime, mode), so that a token change takes effect at once. The agent token's
password (`<data>/server/agent-token`, else the configured token) grants the agent routes, as
user `node` or `server`; the server token's password (`<data>/server/token`, else the configured
token) with user `server` also grants RKE2's server-only routes (which answer 501: RKE2's own
supervisor serves them). A valid agent credential on a server-only route is 403. Requests that
act as a node (the kubelet CSR routes, the cluster route) must also prove the node's name with
its node password (`node_auth.py`), and a server's name is never an agent's.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import threading
from email.message import Message
from pathlib import Path

from rke2certd.errors import Rke2certdError
from rke2certd.files.exposure import warn_if_exposed
from rke2certd.node.bootstrap_data import configured_token
from rke2certd.node.node import Node
from rke2certd.pki.join_token import parse_token
from rke2certd.supervisor import (
    AGENT_USER,
    MAX_CSR_BYTES,
    NODE_NAME_HEADER,
    NODE_PASSWORD_HEADER,
    SERVER_USER,
)
from rke2certd.supervisor.node_auth import NodePasswords, NodeRefused
from rke2certd.supervisor.request import Caller, Refused

CHALLENGE = {"WWW-Authenticate": 'Basic realm="rke2"'}
# Kubernetes node names are RFC 1123 subdomains.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# Token file -> (inode, size, mtime, mode) when read, and its bytes: two files per data dir.
# The mode is in it so that a chmod is seen, and warned about, as before. Missed: a rewrite in
# place to the same size within one mtime tick of the file system (a rename is a new inode).
_SEEN_TOKENS: dict[Path, tuple[tuple[int, int, int, int], bytes]] = {}
_SEEN_LOCK = threading.Lock()


def _saved_token(path: Path, what: str) -> bytes | None:
    """The bytes of token file `path` (None: no file), read again only when its stat changed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    with _SEEN_LOCK:
        seen = _SEEN_TOKENS.get(path)
    if seen is not None and seen[0] == stamp:
        return seen[1]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if data:
        warn_if_exposed(path, what)  # itself once per file, inode and mode
    with _SEEN_LOCK:
        _SEEN_TOKENS[path] = (stamp, data)
    return data


def _token_password(node: Node, name: str) -> str | None:
    saved = _saved_token(node.layout.server / name, f"the {name} file")
    text = saved.decode().strip() if saved else configured_token(node.cfg, node.layout)
    return parse_token(text).password if text else None


def agent_password(node: Node) -> str | None:
    """The password agents must send: `server/agent-token`'s, else the configured token's."""
    return _token_password(node, "agent-token")


def server_password(node: Node) -> str | None:
    """The server token's password: `server/token`'s, else the configured token's."""
    return _token_password(node, "token")


def _same(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _basic_credentials(header: str | None) -> tuple[str, str]:
    if not header:
        raise Refused(401, "credentials required (basic auth node:<password>)", CHALLENGE)
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise Refused(401, "only basic auth is accepted", CHALLENGE)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Refused(401, "malformed basic auth credentials", CHALLENGE) from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise Refused(401, "malformed basic auth credentials", CHALLENGE)
    return user, password


def _node_name(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    name = value.strip()
    if len(name) > 253 or not _NODE_NAME.fullmatch(name):
        raise Refused(400, f"{NODE_NAME_HEADER} is not a valid node name (RFC 1123, lowercase)")
    return name


def authenticate(node: Node, role: str, headers: Message, remote_addr: str) -> Caller:
    """The caller of a route open to `role` (AGENT_USER or SERVER_USER); raises Refused."""
    user, password = _basic_credentials(headers.get("Authorization"))
    try:
        agent, server = agent_password(node), server_password(node)
    except (Rke2certdError, OSError, UnicodeDecodeError) as exc:
        raise Refused(503, f"this server cannot read its tokens: {exc}") from None
    if agent is None and server is None:
        raise Refused(503, "this server has no agent token yet (run rke2certd renew)")
    # Which pair grants what: the server token's password with user server is a server;
    # the agent token's password (with either user) or the server token's with user node
    # is an agent. Both compared, always, so that timing says nothing about which matched.
    is_server = _same(password, server) & (user == SERVER_USER)
    is_agent = _same(password, agent) | _same(password, server)
    if not (is_server or is_agent):
        raise Refused(401, "wrong credentials", CHALLENGE)
    if user not in (AGENT_USER, SERVER_USER):
        raise Refused(403, "only the users node and server may use this endpoint")
    granted = SERVER_USER if is_server else AGENT_USER
    if role == SERVER_USER and granted != SERVER_USER:
        raise Refused(403, "this route is for servers only (the agent token cannot use it)")
    return Caller(granted, _node_name(headers.get(NODE_NAME_HEADER)), remote_addr)


def body_length(headers: Message) -> int:
    """The request body's length: a Content-Length, one, within MAX_CSR_BYTES, not zero."""
    if headers.get("Transfer-Encoding"):
        raise Refused(411, "send the body with a Content-Length (no chunked encoding)")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise Refused(411, "Content-Length required")
    if len(values) > 1 or not values[0].strip().isdigit():
        raise Refused(400, "invalid Content-Length")
    length = int(values[0])
    if length > MAX_CSR_BYTES:
        raise Refused(413, f"the body is larger than {MAX_CSR_BYTES} bytes")
    if length == 0:
        raise Refused(400, "empty body")
    return length


def prove_node(passwords: NodePasswords | None, node_name: str, headers: Message) -> None:
    """The caller is `node_name`: its node password, recorded at first use, proves it."""
    if passwords is None:
        raise Refused(503, "this server has no datastore to check node passwords with")
    try:
        passwords.check(node_name, headers.get(NODE_PASSWORD_HEADER))
    except NodeRefused as exc:
        raise Refused(exc.status, exc.reason) from None
    except Rke2certdError as exc:  # the datastore: the agent retries (or another server)
        raise Refused(503, f"the datastore did not answer: {str(exc)[:300]}") from None
