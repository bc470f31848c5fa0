"""The daemon's one-line STATUS= for systemd (`systemctl status`): what it waits for, watches
and serves, the next certificate expiry, the all-OK verdict and the rollout's step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rke2certd.commands.check import check

if TYPE_CHECKING:
    from rke2certd.daemon.loop import Daemon


@dataclass
class StatusLine:
    certs: str | None = None  # cached until the next renew: reading every cert is wasteful
    sent: str = ""  # the last one sent

    def compose(self, d: Daemon) -> str:
        parts = []
        first_start = d.waiting.first_start
        if d.waiting.reason is not None:
            parts.append(d.waiting.reason)
            if not first_start:
                parts.append("renewing from the certificates on disk; NOT serving agents")
        staging = d.staging.status_text()
        if staging:
            parts.append(staging)
        if d.deferred:
            parts.append("servers unreachable, on the certificates on disk, retrying")
        if d.endpoint.handle is not None:
            parts.append(f"serving agents on port {d.endpoint.handle.port}")
        elif d.endpoint.error:
            parts.append("NOT serving agents (see the journal)")
        certs = self._certs(d)
        if certs:
            parts.append(certs)
        if d.monitor.status_text() and not first_start:  # no certificates yet, by design
            parts.append(d.monitor.status_text())
        if d.runner is not None:
            parts.append(d.runner.status_text())
        return "; ".join(parts) or "running"

    def _certs(self, d: Daemon) -> str:
        if self.certs is None:
            result = check(d.node, [], d.clock())
            d.monitor.certs(d.role, result)
            rows = [r for r in result.rows if r.index == 0]
            self.certs = ""
            if rows:
                first = min(rows, key=lambda r: r.not_after)
                self.certs = (
                    f"{len(rows)} certificates; next expiry {first.path.name} on "
                    f"{first.not_after.strftime('%Y-%m-%d %H:%M')} UTC"
                )
        return self.certs
