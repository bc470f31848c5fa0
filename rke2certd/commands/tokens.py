"""`rke2certd token [show|hash]`: the node's join tokens and the CA hash they pin; after a CA
rotation, the new hash into the tokens of the node's config."""

from __future__ import annotations

from pathlib import Path

from rke2certd.errors import Rke2certdError
from rke2certd.files.atomic import read_optional
from rke2certd.node.node import Node
from rke2certd.pki import join_token as tokens


def show_tokens(node: Node) -> str:
    lines = []
    for name, label in (("token", "server token"), ("agent-token", "agent token")):
        data = read_optional(node.layout.server / name)
        if data:
            lines.append(f"{label}: {data.decode().strip()}")
    if not lines:
        raise Rke2certdError(
            f"no tokens in {node.layout.server}; run `rke2certd renew` on a server first"
        )
    return "\n".join(lines) + "\n"


def show_hash(node: Node) -> str:
    for path in (node.layout.ca_cert("server-ca"), node.layout.agent_server_ca):
        data = read_optional(path)
        if data:
            return tokens.ca_hash(data) + "\n"
    raise Rke2certdError(f"no server CA on this node ({node.layout.ca_cert('server-ca')})")


def rewrite_config_tokens(node: Node, new_hash: str, *, dry_run: bool = False) -> list[Path]:
    """The new CA hash into the full tokens of every config file this node read and its token
    file, journaled in the data dir. The caller holds the node lock."""
    from rke2certd.node.rke2_config_tokens import rewrite_token_hashes

    cfg = node.cfg
    token_files = [cfg.token_file] if cfg.token_file else []
    return rewrite_token_hashes(
        cfg.sources, token_files, new_hash, dry_run=dry_run, journal_dir=node.layout.data_dir
    )
