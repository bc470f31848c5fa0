"""What the daemon waits for while it cannot start for real: RKE2's first start on this node,
or a server's datastore that does not answer. It stays up meanwhile (READY, the reason in
STATUS=), retrying after a pause doubling from datastore-retry-min up to -max."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rke2certd.config import Config
from rke2certd.errors import Rke2certdError
from rke2certd.node.node import Node
from rke2certd.roles.agent import FIRST_START as AGENT_FIRST_START
from rke2certd.roles.server import FIRST_START

FIRST_STARTS = (FIRST_START, AGENT_FIRST_START)


@dataclass
class Waiting:
    reason: str | None = None  # None: started
    delay: float = 0.0  # the pause before the next retry
    next_retry: float = 0.0  # monotonic

    @property
    def first_start(self) -> bool:
        """Waiting for RKE2's first start: no certificates here yet, by design."""
        return self.reason in FIRST_STARTS

    def back_off(self, first: float, cap: float) -> float:
        self.delay = min(cap, self.delay * 2 or first)
        self.next_retry = time.monotonic() + self.delay
        return self.delay

    def reset(self) -> None:
        self.reason = None
        self.delay = 0.0


def waiting_text(cfg: Config, node: Node, exc: Rke2certdError) -> str:
    from rke2certd.node.rke2_datastore import DB_INFO_PATH, plan_datastore

    try:
        plan = plan_datastore(cfg, node.layout)
    except Rke2certdError:
        return f"waiting for the datastore: {first_line(exc)}"
    whose = "RKE2's datastore" if plan.shared_with_rke2 else "the datastore"
    where = plan.endpoint or f"{cfg.server}{DB_INFO_PATH}"
    return f"waiting for {whose} at {where}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
