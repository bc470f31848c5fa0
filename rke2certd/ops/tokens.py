"""`rke2certd token [show|hash]`: the node's join tokens and the CA hash they pin."""

from __future__ import annotations

from rke2certd.errors import Rke2certdError
from rke2certd.ops.node import Node
from rke2certd.pki import token as tokens
from rke2certd.store.atomic import read_optional


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
