"""An agent-only node's part in a rollout: what `apply` means for it, and what it knows.

Agents hold no datastore credentials: their coordination keys go through a server's endpoint
(`supervisor.remote.RemoteDatastore`), trusted by the server CA on disk. Applying a CA rollout:

1. Adopt the rotated CA. The token pins the OLD CA's hash, so `/cacerts` no longer matches it.
   A server that proves itself with the CA this agent already holds (`agent/server-ca.crt`:
   a cross-signed rotation keeps the old CA in the chain) is trusted to serve the new bundle;
   the new hash goes into the token, in every config file that holds the full token and in
   the token file (atomically, the rest of each file kept). Without a CA on disk to check the
   server by, the mismatch stays an error: pinning is never skipped.
2. `renew` through the server with the new token: new certs from the new CAs (the keys stay).
3. The generation: the server's, if the CA bundles on this disk are the ones it serves.

An agent that missed a rotation (down during the rollout, skipped) joins the same way: its
token pins the old CA, so its first renew finds the servers' CA changed; `rejoin_renew` then
takes the adoption path above (the server proves itself through the chain to the CA on disk)
and renews with the new token, as the agent phase would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime

from rke2certd.commands.agent import agent_renew, agent_token, node_password, supervisor_urls
from rke2certd.commands.renew import RenewResult
from rke2certd.commands.tokens import rewrite_config_tokens
from rke2certd.errors import Rke2certdError, TokenError
from rke2certd.files.atomic import read_optional
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.pki.join_token import format_token, parse_token
from rke2certd.supervisor import AGENT_USER
from rke2certd.supervisor.client import fetch_cacerts_trusted, locate_cacerts
from rke2certd.supervisor.remote import RemoteDatastore


def trusted_bundle(node: Node) -> bytes:
    """The server CAs this agent trusts: its `agent/server-ca.crt`, pinned by the token when it
    was written (after a cross-signed rotation it holds the new CAs and, after them, the old)."""
    held = read_optional(node.layout.agent_server_ca)
    if held is None:
        raise TokenError("no server CA is known yet: `rke2certd renew` has not run on this agent")
    return held


def remote_store(node: Node, token: Callable[[], str]) -> RemoteDatastore:
    return RemoteDatastore(
        supervisor_urls(node.cfg),
        token,
        lambda: trusted_bundle(node),
        node.cfg.node,
        node_password=lambda: node_password(node),
        prefer_again=node.cfg.preferred_server_retry,
    )


def adopt_rotated_ca(node: Node, token: str, *, dry_run: bool = False) -> str | None:
    """The token for the servers' current CA when it changed (None: the token still fits)."""
    urls, parsed = supervisor_urls(node.cfg), parse_token(token)
    if parsed.ca_hash is None:
        return None  # nothing pinned: renew takes the CA as served, as RKE2 does
    try:
        locate_cacerts(urls, token)
        return None
    except TokenError as mismatch:
        held = read_optional(node.layout.agent_server_ca)
        if held is None:
            raise TokenError(f"{mismatch}; and no CA on disk to check the server by") from None
    url, _bundle, new_hash = fetch_cacerts_trusted(urls, held)
    new_token = format_token(new_hash, parsed.username or AGENT_USER, parsed.password)
    files = rewrite_config_tokens(node, new_hash, dry_run=dry_run)
    log.info(
        "ca_adopted",
        server_url=url,
        ca_hash=new_hash,
        old_ca_hash=parsed.ca_hash,
        files=",".join(str(f) for f in files),
        reason="the server proved itself with the CA on disk and serves a rotated CA",
    )
    return new_token


def agent_generation(node: Node, remote: RemoteDatastore) -> str | None:
    """The server's CA generation if this disk holds the CA bundles it serves, else None."""
    try:
        generation, digests = remote.served_generation()
    except Rke2certdError as exc:
        log.debug("generation_unknown", reason=str(exc))
        return None
    layout = node.layout
    for name, path in (
        ("server-ca", layout.agent_server_ca),
        ("client-ca", layout.agent_client_ca),
    ):
        data = read_optional(path)
        if data is None or hashlib.sha256(data).hexdigest() != digests.get(name):
            return None
    return generation


def rejoin_renew(
    node: Node, now: datetime, *, token: str | None = None, dry_run: bool = False
) -> tuple[RenewResult, str | None]:
    """`agent_renew`, and when the servers' CA no longer matches the token (a rotation this
    agent missed) the adoption above, then the renew with the adopted token. Returns the result
    and the adopted token (None: the token fitted). Without a CA on disk that the server proves
    itself by, the mismatch stays an error. The caller holds the node lock (not for dry runs)."""
    try:
        return agent_renew(node, now, token=token, dry_run=dry_run), None
    except TokenError as mismatch:
        try:
            adopted = adopt_rotated_ca(node, token or agent_token(node), dry_run=dry_run)
        except Rke2certdError as exc:
            raise TokenError(f"{mismatch}; rejoining by the CA on disk failed: {exc}") from None
        if adopted is None:
            raise  # the token fits after all: the mismatch was something else
    log.info("agent_rejoined", node=node.cfg.node, reason="adopted the servers' rotated CA")
    return agent_renew(node, now, token=adopted, dry_run=dry_run), adopted
