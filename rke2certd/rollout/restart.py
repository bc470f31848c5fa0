"""This node's restart in a rollout: the job that runs it (rollout/job.py), what it began on,
and the status it reports when it ends."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from rke2certd.datastore.base import KV
from rke2certd.node.node import Node
from rke2certd.plan.rollout import NodeState, NodeStatus, Phase, Rollout, Slot
from rke2certd.rollout import records as rec
from rke2certd.rollout.health import default_probes
from rke2certd.rollout.job import Gate, JobResult, RestartJob

# Never handed to restart/health commands: they would notify or feed the watchdog as us.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass
class Running:
    job: RestartJob
    rollout: Rollout
    slot: Slot
    applied_at: datetime | None  # from the status it restarts after
    started: datetime
    generation: str | None
    slot_kv: KV | None  # the slot's key as read when the restart began
    seen: rec.Parsed  # the read it began on: its status key has not changed since

    def final_status(self, me: str, now: datetime) -> tuple[NodeStatus, str]:
        """The status to report for the finished job, and its words."""
        res = self.job.result
        assert res is not None
        if res.ok:
            state = NodeState.DONE
            message = f"restart {res.restart_seconds:.1f}s, health gate {res.health_seconds:.1f}s"
        else:
            state, message = NodeState.FAILED, f"{res.step} failed: {res.message}"
        status = NodeStatus(
            me,
            state,
            message,
            self.generation,
            self.applied_at,
            self.started,
            now,
            restart_seconds=res.restart_seconds,
            health_seconds=res.health_seconds,
        )
        return status, message


def durations(res: JobResult) -> dict[str, float]:
    """For the metrics' histograms: the restart's, and the gate's if it ran."""
    out = {"restart_seconds": res.restart_seconds}
    if res.step == "health":
        out["health_seconds"] = res.health_seconds
    return out


def new_job(
    node: Node, unit: str, r: Rollout, phase: Phase, gen: str | None, wake: Callable[[], None]
) -> tuple[RestartJob, list[str]]:
    """The restart job for `r` (not started), and the restart command it runs."""
    cfg = node.cfg
    restart = cfg.restart_command or ["systemctl", "restart", unit]
    gate = Gate(cfg.health_command) if cfg.health_command else Gate(None, default_probes(node))
    job = RestartJob(
        restart,
        gate,
        _env(node, r, phase, gen),
        restart_timeout=cfg.restart_timeout,
        health_timeout=cfg.health_timeout,
        wake=wake,
    )
    return job, restart


def _env(node: Node, r: Rollout, phase: Phase, gen: str | None) -> dict[str, str]:
    cfg = node.cfg
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    env.update(
        RKE2CERTD_NODE=cfg.node,
        RKE2CERTD_PHASE=phase.value,
        RKE2CERTD_ROLES=",".join(r.value for r in cfg.roles),
        RKE2CERTD_ROLLOUT=r.id,
        RKE2CERTD_ROLLOUT_KIND=r.kind.value,
        RKE2CERTD_CA_GENERATION=gen or "",
        RKE2CERTD_DATA_DIR=str(cfg.data_dir),
    )
    return env
