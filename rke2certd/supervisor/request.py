"""What every part of a request's handling shares: who the caller is, and the error answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Who made an authenticated request: token user, node name header (validated), address."""

    user: str
    node_name: str | None
    remote_addr: str


class Refused(Exception):
    """An HTTP error answer; raised anywhere in a request, sent and logged by the handler.
    `code`, when set, is a machine-readable reason the client acts on (wire.py's codes)."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Mapping[str, str] | None = None,
        *,
        code: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})
        self.code = code


def clip(text: str, limit: int = 120) -> str:
    """Request text is attacker-controlled: keep it short and printable in logs."""
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable if len(printable) <= limit else printable[: limit - 3] + "..."
