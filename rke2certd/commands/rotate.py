"""`rke2certd certificate rotate`: back up, then new keys and certs at once (no gap)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rke2certd.errors import UsageError
from rke2certd.files.atomic import TEMP_MARK, FileWrite, ensure_dir, recover, write_files
from rke2certd.log import log
from rke2certd.node.node import Node, check_dir_safety
from rke2certd.pki.profiles import SERVICES, by_service, leaves_for

if TYPE_CHECKING:
    from rke2certd.commands.renew import RenewResult
    from rke2certd.datastore.base import Datastore


@dataclass
class RotateResult:
    services: list[str]
    backup_dir: Path | None
    renew: RenewResult
    markers: list[Path] = field(default_factory=list)


def parse_services(values: Sequence[str]) -> list[str]:
    """Comma lists and repeated flags; an unknown name fails before anything changes."""
    names: list[str] = []
    for value in values:
        names += [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise UsageError("; ".join(f"service {n} is not recognized" for n in unknown))
    return list(dict.fromkeys(names))


def backup(node: Node, now: datetime, agent_files: Sequence[Path]) -> Path:
    """Copy server/tls to server/tls-<unix-ts> (agent files under its agent/), modes kept."""
    tls = node.layout.tls
    ts = int(now.timestamp())
    dest = node.layout.server / f"tls-{ts}"
    n = 1
    while dest.exists():  # two rotations in one second must not mix their backups
        dest = node.layout.server / f"tls-{ts}.{n}"
        n += 1
    writes: list[FileWrite] = []
    for src in sorted(tls.rglob("*")):
        if src.is_file() and not src.is_symlink() and not src.name.startswith(TEMP_MARK):
            mode = src.stat().st_mode & 0o777
            writes.append(FileWrite(dest / src.relative_to(tls), src.read_bytes(), mode))
    for src in agent_files:
        if src.is_file():
            mode = src.stat().st_mode & 0o777
            writes.append(FileWrite(dest / "agent" / src.name, src.read_bytes(), mode))
    ensure_dir(dest, 0o700)
    write_files(node.layout.data_dir, writes)
    return dest


def rotate(
    node: Node, services: Sequence[str], now: datetime, datastore: Datastore | None = None
) -> RotateResult:
    """The caller holds the node lock and has validated `services` with parse_services."""
    # Imported here: `certificate check` uses parse_services and must not pay for cryptography.
    from rke2certd.commands.renew import NeedsServerError, renew

    cfg = node.cfg
    if not cfg.is_server:
        raise NeedsServerError(
            "this node has only the agent role: rotating its certificates needs a server to "
            "sign them; nothing was changed"
        )
    selected = list(services) or list(SERVICES)
    specs = by_service(leaves_for(True, cfg.has_agent), selected)
    agent_files = [
        p for s in specs if s.agent for p in (s.cert_path(node.layout), s.key_path(node.layout))
    ]
    # Before copying anything: refuse unsafe dirs, and finish (or undo) a write a crash
    # interrupted, so the backup holds whole pairs and its journal does not replace that one.
    check_dir_safety(node.key_dirs())
    for what in recover(node.layout.data_dir, node.write_dirs()):
        log.warning("write_repaired", reason=what)
    backup_dir = backup(node, now, agent_files) if node.layout.tls.exists() else None
    if backup_dir:
        log.info("certs_backed_up", cert_path=str(backup_dir), services=",".join(selected))
    result = renew(
        node, now, force=frozenset(s.name for s in specs), specs=specs, datastore=datastore
    )
    markers: list[Path] = []
    if "rke2-server" in selected:
        markers.append(node.layout.dynamic_cert_regenerate)
    markers.append(node.layout.force_restart)
    write_files(node.layout.data_dir, [FileWrite(m, b"", 0o600) for m in markers])
    return RotateResult(selected, backup_dir, result, markers)
