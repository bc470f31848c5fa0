"""Fixtures of the engine tests: nodes built in-process with an injected clock, on a tmpfs.

Nodes live on a session tmpfs when the tests may mount one (root): every write of rke2certd
is fsynced, which costs milliseconds each on a disk and nothing on tmpfs; the file system
semantics the tests rely on (rename, modes, mtimes) are the same. RKE2CERTD_TEST_TMPFS=0 keeps
everything under pytest's tmp dir. The kill -9 test stays on the disk on purpose.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from rke2certd.node.node import Node
from tests.conftest import FrozenClock, write_node_config

from .helpers import load_node, renew_at

CA_AGE_DAYS = 730  # the CAs of a live node are two years old: leaves can be aged freely


@dataclass
class LiveNode:
    cfg: Path
    data: Path
    node: Node
    ca_time: datetime  # when its CAs were made
    issued: datetime  # when its leaves were issued (the clock's time at creation)

    def reload(self, **overrides: Any) -> Node:
        """The node as a fresh process would read it (after the config file changed)."""
        self.node = load_node(self.cfg, **overrides)
        return self.node


def build_live_node(tmp_path: Path, clock: FrozenClock, **config: Any) -> LiveNode:
    """A complete node: CAs made CA_AGE_DAYS ago, every leaf issued at `clock()`."""
    cfg, data = write_node_config(tmp_path, **config)
    node = load_node(cfg)
    ca_time = clock.at(days=-CA_AGE_DAYS)
    renew_at(node, ca_time)  # creates the CA set (and leaves that are long expired by now)
    renew_at(node, clock())  # re-issues every leaf now, with the same keys
    return LiveNode(cfg, data, node, ca_time, clock())


@pytest.fixture(autouse=True)
def quiet_in_process_logs() -> Iterator[None]:
    """In-process renewals log every decision; keep only warnings so failures stay readable."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**old)


_serial = itertools.count()


@pytest.fixture(scope="session")
def fast_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """A tmpfs for the session's nodes, or None when none can be mounted."""
    if os.environ.get("RKE2CERTD_TEST_TMPFS", "1") == "0" or os.geteuid() != 0:
        yield None
        return
    mount = tmp_path_factory.mktemp("tmpfs")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fresh_dir(fast_disk: Path | None, fallback: Path, name: str) -> Path:
    """A new empty dir on the tmpfs (or `fallback` when there is none)."""
    if fast_disk is None:
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback
    d = fast_disk / f"{next(_serial):04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:60]}"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def work_dir(fast_disk: Path | None, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The test's own dir for nodes: on the tmpfs when there is one, else `tmp_path`."""
    return fresh_dir(fast_disk, tmp_path, request.node.name)


@pytest.fixture
def live_node(work_dir: Path, clock: FrozenClock) -> LiveNode:
    return build_live_node(work_dir / "node", clock)


@pytest.fixture
def make_live_node(work_dir: Path, clock: FrozenClock) -> Callable[..., LiveNode]:
    """`make_live_node("name", **config)`: several live nodes in one test."""

    def make(name: str = "node", **config: Any) -> LiveNode:
        return build_live_node(work_dir / name, clock, **config)

    return make
