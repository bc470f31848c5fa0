"""The watched staging dir: each finished set goes through rotate-ca, then is filed away.

`<staging>/<name>/` is applied (or refused) and moved to `.applied/<name>-<ts>/` or
`.rejected/<name>-<ts>/`, with `result.json` and `result.txt` inside saying what was done or
every reason it was refused. The result is written into the set before the move, so a set is
never filed without its result; a crash between saving and filing re-processes the set, which
then finds its data already in the datastore and is filed as applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError, ValidationError
from rke2certd.log import log
from rke2certd.ops.node import Node
from rke2certd.ops.rotate_ca import RotateCAResult, rotate_ca
from rke2certd.plan.staging import FORCE_MARKER
from rke2certd.store.atomic import FileWrite, ensure_dir, move, write_files

APPLIED, REJECTED = ".applied", ".rejected"


@dataclass
class StagingOutcome:
    name: str
    status: str  # applied | unchanged | rejected
    filed_as: Path
    reasons: list[str] = field(default_factory=list)
    result: RotateCAResult | None = None


def staging_problems(path: Path) -> list[str]:
    """Why the daemon must refuse to take CA sets from `path` (empty: it is safe)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return [f"{path} does not exist"]
    problems = []
    if not os.path.isdir(path) or path.is_symlink():
        problems.append(f"{path} is not a directory (a symlink is refused too)")
    if st.st_uid != os.geteuid():
        problems.append(f"{path} is owned by uid {st.st_uid}, not by root (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        problems.append(f"{path} is writable by group or others (mode {st.st_mode & 0o777:o})")
    return problems


def refusal(path: Path) -> ValidationError | None:
    """The error to refuse `path` with, or None when it is safe (the daemon checks it at start
    and reload, and its watcher before every use)."""
    problems = staging_problems(path)
    if not problems:
        return None
    return ValidationError(
        f"refusing to take CA sets from the staging dir {path}: anyone who can write there "
        "could replace the cluster's CAs; fix it with `chown root:root` and `chmod 0700`",
        problems,
    )


def prepare(path: Path) -> None:
    """Create the staging dir (0700) when missing; refuse an unsafe one, loudly."""
    if not path.exists():
        ensure_dir(path, 0o700)
    error = refusal(path)
    if error is not None:
        raise error


def list_sets(path: Path) -> list[str]:
    """Candidate sets: entries not starting with a dot, in name order."""
    try:
        return sorted(e.name for e in os.scandir(path) if not e.name.startswith("."))
    except FileNotFoundError:
        return []


def _result_doc(outcome: StagingOutcome, now: datetime, force: bool) -> dict[str, Any]:
    r = outcome.result
    doc: dict[str, Any] = {
        "apiVersion": "rke2certd.io/v1",
        "kind": "StagedSetResult",
        "name": outcome.name,
        "status": outcome.status,
        "time": now.isoformat(),
        "force": force,
        "reasons": outcome.reasons,
    }
    if r is not None:
        doc |= {
            "changed": r.changed,
            "warnings": r.warnings,
            "forcedPast": r.forced,
            "caGeneration": {"old": r.old_generation, "new": r.new_generation},
            "caHash": {"old": r.old_hash, "new": r.new_hash},
            "tokensChanged": r.new_hash != r.old_hash,
        }
    return doc


def _result_text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['name']}: {doc['status']} at {doc['time']}"]
    if doc["status"] == "rejected":
        lines.append("Refused, nothing changed. Every reason:")
    lines += [f"  - {r}" for r in doc["reasons"]]
    for key in ("changed", "warnings", "forcedPast"):
        if doc.get(key):
            lines.append(f"{key}:")
            lines += [f"  - {v}" for v in doc[key]]
    if doc.get("caGeneration"):
        gen = doc["caGeneration"]
        lines.append(f"CA generation: {gen['old']} -> {gen['new']}")
    if doc.get("tokensChanged"):
        lines.append(
            "The CA hash changed: the join tokens change. Servers rewrite server/token when "
            "they take the new CAs; `rke2certd token show` prints them. Reconfigure nodes "
            "joined with the old token."
        )
    return "\n".join(lines) + "\n"


def apply_set(
    node: Node, staging: Path, name: str, now: datetime, datastore: Datastore
) -> StagingOutcome:
    """rotate-ca on one staged set, then file it with its result."""
    src = staging / name
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    if src.is_symlink() or not src.is_dir():
        outcome = StagingOutcome(name, "rejected", staging / REJECTED / f"{name}-{stamp}")
        outcome.reasons = [f"{src} is not a directory (symlinks and plain files are refused)"]
        _file_odd_entry(src, outcome, now)
        return outcome
    force = (src / FORCE_MARKER).is_file() and not (src / FORCE_MARKER).is_symlink()
    outcome = StagingOutcome(name, "rejected", Path())
    try:
        result = rotate_ca(node, src, force=force, dry_run=False, now=now, datastore=datastore)
        outcome.result = result
        outcome.status = "unchanged" if result.nothing_to_do else "applied"
        if result.nothing_to_do:
            outcome.reasons = ["the set equals the CA data in the datastore (already applied)"]
    except ValidationError as exc:
        outcome.reasons = [exc.summary, *exc.problems]
    except Rke2certdError as exc:
        outcome.reasons = [str(exc)]
    bucket = REJECTED if outcome.status == "rejected" else APPLIED
    outcome.filed_as = _unique(staging / bucket / f"{name}-{stamp}")
    doc = _result_doc(outcome, now, force)
    write_files(
        src,
        [
            FileWrite(src / "result.json", (json.dumps(doc, indent=2) + "\n").encode(), 0o600),
            FileWrite(src / "result.txt", _result_text(doc).encode(), 0o600),
        ],
    )
    ensure_dir(outcome.filed_as.parent, 0o700)
    move(src, outcome.filed_as)
    log.log(
        40 if outcome.status == "rejected" else 20,
        "staged_set_" + outcome.status,
        staged_set=name,
        cert_path=str(outcome.filed_as),
        reason="; ".join(outcome.reasons),
        ca_generation=outcome.result.new_generation if outcome.result else None,
        force=force,
    )
    return outcome


def _file_odd_entry(src: Path, outcome: StagingOutcome, now: datetime) -> None:
    dest = _unique(outcome.filed_as)
    outcome.filed_as = dest
    ensure_dir(dest, 0o700)
    move(src, dest / src.name)
    doc = _result_doc(outcome, now, False)
    write_files(
        dest,
        [
            FileWrite(dest / "result.json", (json.dumps(doc, indent=2) + "\n").encode(), 0o600),
            FileWrite(dest / "result.txt", _result_text(doc).encode(), 0o600),
        ],
    )
    log.error("staged_set_rejected", staged_set=src.name, reason=outcome.reasons[0])


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate
