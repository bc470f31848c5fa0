"""The server/agent seam: `role_for` picks the node's role from its config, once."""

from __future__ import annotations

from rke2certd.clock import Clock, system_clock
from rke2certd.node.node import Node
from rke2certd.roles.agent import AgentNode
from rke2certd.roles.base import NodeRole, RenewHook
from rke2certd.roles.server import ServerNode

__all__ = ["AgentNode", "NodeRole", "ServerNode", "role_for"]


def role_for(node: Node, clock: Clock = system_clock, renewed: RenewHook | None = None) -> NodeRole:
    """A server (etcd or control-plane role) holds the datastore; any other node is an agent."""
    if node.cfg.is_server:
        return ServerNode(node, clock, renewed)
    return AgentNode(node, clock, renewed)
