"""Command output for `renew` and `rotate`: text for people, JSON for scripts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rke2certd.commands.renew import RenewResult
from rke2certd.commands.rotate import RotateResult

if TYPE_CHECKING:
    from rke2certd.commands.generate import GenerateResult
    from rke2certd.commands.rotate_ca import RotateCAResult

API_VERSION = "rke2certd.io/v1"


def renew_doc(result: RenewResult) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RenewResult",
        "dryRun": result.dry_run,
        "createdCAs": result.created_cas,
        "changes": [
            {
                "path": str(c.path),
                "service": c.service,
                "action": c.action,
                "reasons": list(c.reasons),
                "newKey": c.new_key,
                "oldSerial": c.old_serial,
                "newSerial": c.new_serial,
                "oldNotAfter": c.old_not_after.isoformat() if c.old_not_after else None,
                "newNotAfter": c.new_not_after.isoformat() if c.new_not_after else None,
            }
            for c in result.changes
        ],
        "derived": [str(p) for p in result.derived],
        "repaired": result.repaired,
        "restart": result.restart_units,
        "skipped": result.skipped,
    }


def render_renew(result: RenewResult, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(renew_doc(result), indent=2) + "\n"
    verb = "would " if result.dry_run else ""
    if result.skipped:
        return f"nothing to renew: {result.skipped}\n"
    lines = []
    if result.created_cas:
        lines.append(f"{verb}create the self-signed CA set and service.key")
    for what in result.repaired:
        lines.append(f"repaired: {what}")
    for c in result.changes:
        action = {"issue": "issue", "rechain": "update the chain of"}[c.action]
        detail = "; ".join(c.reasons)
        expiry = ""
        if c.new_not_after is not None:
            expiry = f" (serial {c.old_serial or '-'} -> {c.new_serial}, "
            old = c.old_not_after.date().isoformat() if c.old_not_after else "-"
            expiry += f"expiry {old} -> {c.new_not_after.date().isoformat()})"
        lines.append(f"{verb}{action} {c.path}: {detail}{expiry}")
    for p in result.derived:
        lines.append(f"{verb}update {p}")
    if not lines:
        lines.append("all certificates are valid; nothing to do")
    elif result.restart_units and not result.dry_run:
        lines.append("restart " + ", ".join(result.restart_units) + " to load the new files")
    return "\n".join(lines) + "\n"


def render_rotate(result: RotateResult) -> str:
    lines = []
    if result.backup_dir:
        lines.append(f"backed up the certificates to {result.backup_dir}")
    lines.append(render_renew(result.renew, "text").rstrip("\n"))
    for m in result.markers:
        lines.append(f"wrote {m}")
    units = result.renew.restart_units or ["rke2-server"]
    lines.append("restart " + ", ".join(units) + " to load the rotated certificates")
    return "\n".join(lines) + "\n"


def render_rotate_ca(result: RotateCAResult) -> str:
    lines = [f"warning: {w}" for w in result.warnings]
    lines += [f"warning: forced past: {p}" for p in result.forced]
    if result.nothing_to_do:
        lines.append(f"{result.path}: the staged set equals the current CA data; nothing to do")
        return "\n".join(lines) + "\n"
    verb = "would save" if result.dry_run else "saved"
    lines.append(f"{verb} to the datastore: " + ", ".join(result.changed))
    lines.append(f"CA generation {result.old_generation} -> {result.new_generation}")
    if result.server_token:
        lines.append(f"the CA hash changed ({result.old_hash} -> {result.new_hash}); new tokens:")
        lines.append(f"  server token: {result.server_token}")
        lines.append(f"  agent token:  {result.agent_token}")
        lines.append(
            "  reconfigure every node joined with a secure token before it restarts "
            "(rke2certd rewrites the token of nodes it manages)"
        )
    if not result.dry_run:
        lines.append(
            "next: run `rke2certd renew` and restart RKE2 on every server (etcd servers first, "
            "then control-plane), then on agents; the rke2certd daemon does this in that order"
        )
    return "\n".join(lines) + "\n"


def render_generate(result: GenerateResult) -> str:
    lines = [*result.messages]
    lines += [f"wrote {p}" for p in result.written]
    if result.server_token:
        lines.append(f"new server token: {result.server_token}")
    if result.agent_token:
        lines.append(f"new agent token:  {result.agent_token}")
    if result.backup:
        lines.append("back up these files somewhere safe:")
        lines += [f"  {p}" for p in result.backup]
    if result.remove:
        lines.append("then remove them from every cluster member:")
        lines += [f"  {p}" for p in result.remove]
    return "\n".join(lines) + "\n"
