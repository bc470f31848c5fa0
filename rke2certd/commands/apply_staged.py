"""The watched staging dir: each finished set goes through rotate-ca, then is filed away.

What the daemon trusts (see docs/SECURITY.md): the staging dir itself (root's, 0700, checked
before every use) and root. A set is taken in two steps, so that no set can stop the daemon and
a saved CA is always rolled out:

1. `take_set`: a private copy of the set is made (node/staged_copy.py: nothing followed, every
   entry root's and not writable by others, regular files only, bounded), its layout checked,
   then rotate-ca checks and saves *the copy*: what was checked is what is applied, whatever
   happens to the original afterwards. A set is refused before anything is saved, or saved.
2. the daemon starts the rollout of a saved set, then `file_set` files it:
   `.applied/<name>-<ts>/` or `.rejected/<name>-<ts>/` holding `result.json` and `result.txt`
   (what was done, or every reason it was refused) and `set/` (an applied set: the copy that was
   applied; a refused one: the set as found, unless it is too big to keep). Everything is put
   together in a private dir (`.work/`), the original included, and renamed into place in one
   step, so the set's content cannot collide with the result files, the set leaves the staging
   dir as its result appears, and its name (any bytes, up to 255) is never part of a path
   component longer than allowed. The original of an applied set is removed after that.

Nothing about a set raises: an unexpected error rejects it with that reason, a set that vanished
is ignored with a logged reason. A crash between saving and filing leaves the original in the
staging dir: it is taken again, found equal to the datastore and filed as unchanged (the renew
at start rolls out what was saved). `.applied/` and `.rejected/` keep the newest sets only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rke2certd.commands.rotate_ca import RotateCAResult, rotate_ca
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError, ValidationError
from rke2certd.files.atomic import FileWrite, ensure_dir, move, write_files
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.node.staged_copy import SetGone, Snapshot, remove_tree, shown, snapshot
from rke2certd.plan.ready_sets import FORCE_MARKER
from rke2certd.plan.staged_layout import layout_problems

APPLIED, REJECTED, WORK = ".applied", ".rejected", ".work"
SET_DIR = "set"  # the set's content inside a filed dir, beside result.json and result.txt
# What each bucket keeps: the newest sets, while their total stays under the bytes (the newest
# is always kept). A refused set bigger than KEEP_SET_BYTES keeps only its result files.
KEEP_SETS = {APPLIED: 50, REJECTED: 20}
KEEP_BYTES = {APPLIED: 32 << 20, REJECTED: 32 << 20}
KEEP_SET_BYTES = 4 << 20
_NAME_BYTES = 100  # a set name used as is in a filed name; longer or odd ones are shortened
_PLAIN = frozenset(string.ascii_letters + string.digits + "._-+@=,")


@dataclass
class StagingOutcome:
    name: str  # as found in the staging dir (any bytes, surrogate-escaped)
    status: str  # applied | unchanged | rejected | ignored
    work: Path  # the private dir the set is put together in before it is filed
    filed_as: Path | None = None
    reasons: list[str] = field(default_factory=list)
    summary: str | None = None  # what reasons[0] says of the rest (a ValidationError's summary)
    result: RotateCAResult | None = None
    force: bool = False
    keep_original: bool = True  # a refused set: file it as found (False: too big, or odd)

    @property
    def shown(self) -> str:
        return shown(self.name)


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
    """Create the staging dir (0700) when missing; refuse an unsafe one, loudly; remove what a
    crash left in its private work dir."""
    if not path.exists():
        ensure_dir(path, 0o700)
    error = refusal(path)
    if error is not None:
        raise error
    clean_work(path)


def _result_doc(outcome: StagingOutcome, now: datetime) -> dict[str, Any]:
    r = outcome.result
    doc: dict[str, Any] = {
        "apiVersion": "rke2certd.io/v1",
        "kind": "StagedSetResult",
        "name": outcome.shown,
        "status": outcome.status,
        "time": now.isoformat(),
        "force": outcome.force,
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


def filed_name(name: str, stamp: str) -> str:
    """`<name>-<stamp>`, with a name that is not plain (not UTF-8, other characters, over
    _NAME_BYTES) shortened to a plain prefix and a hash of its bytes: always one path
    component, whatever the set was called."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_BYTES and all(c in _PLAIN for c in name) and not name.startswith("."):
        return f"{name}-{stamp}"
    prefix = "".join(c if c in _PLAIN else "_" for c in name[:40]).lstrip(".") or "set"
    return f"{prefix}~{hashlib.sha256(raw).hexdigest()[:12]}-{stamp}"


def _new_work(staging: Path, now: datetime) -> Path:
    ensure_dir(staging / WORK, 0o700)
    work = staging / WORK / f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(6)}"
    os.mkdir(work, 0o700)
    return work


def process_set(
    node: Node,
    staging: Path,
    name: str,
    now: datetime,
    datastore: Datastore,
    *,
    roll_out: Callable[[StagingOutcome], None] | None = None,
    owner: int | None = None,
) -> StagingOutcome:
    """One staged set, start to end: taken (copied, checked, saved when valid), rolled out when
    it was saved (`roll_out`: the daemon starts the rollout and renews), then filed, even when
    the rollout failed. Raises only what `roll_out` raises, after the set is filed."""
    outcome = take_set(node, staging, name, now, datastore, owner=owner)
    try:
        if outcome.status == "applied" and roll_out is not None:
            roll_out(outcome)
    finally:
        file_set(staging, outcome, now)
    return outcome


def take_set(
    node: Node,
    staging: Path,
    name: str,
    now: datetime,
    datastore: Datastore,
    *,
    owner: int | None = None,
) -> StagingOutcome:
    """Copy, check and (when valid) save one staged set; filing is `file_set`'s. Never raises
    for anything about the set. `owner`: the uid every entry must have (default: ours)."""
    work = _new_work(staging, now)
    out = StagingOutcome(name, "rejected", work)
    label = f"{staging}/{out.shown}"
    try:
        snap = snapshot(staging, name, work / SET_DIR, owner=owner, label=label)
    except SetGone:
        out.status = "ignored"
        out.reasons = [f"{label} was removed or renamed away before it was read"]
        return out
    except Exception as exc:  # no set may stop the daemon
        out.reasons = [f"{label} could not be read: {_what(exc)}"]
        out.keep_original = False
        return out
    out.keep_original = snap.complete and snap.seen_bytes <= KEEP_SET_BYTES
    problems = snap.problems or layout_problems(snap.files, label)
    if problems:
        out.reasons = problems  # result.txt says "Refused, nothing changed" above them
        return out
    out.force = FORCE_MARKER in snap.files
    _check_and_save(node, out, snap, label, now, datastore)
    return out


def _check_and_save(
    node: Node, out: StagingOutcome, snap: Snapshot, label: str, now: datetime, ds: Datastore
) -> None:
    try:
        result = rotate_ca(
            node, snap.copy, force=out.force, dry_run=False, now=now, datastore=ds, label=label
        )
    except ValidationError as exc:
        out.summary = exc.summary
        out.reasons = [exc.summary, *exc.problems]
        return
    except Rke2certdError as exc:
        out.reasons = [str(exc)]
        return
    except Exception as exc:  # no set may stop the daemon
        log.error("staged_set_check_failed", staged_set=out.shown, reason=_what(exc))
        out.reasons = [f"the staged set {label} could not be checked: {_what(exc)}"]
        return
    out.result = result
    out.status = "unchanged" if result.nothing_to_do else "applied"
    if result.nothing_to_do:
        out.reasons = ["the set equals the CA data in the datastore (already applied)"]


def _what(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def file_set(staging: Path, out: StagingOutcome, now: datetime) -> None:
    """File a taken set with its result (see the module doc); never raises. A set that cannot
    be filed is logged and left where it is (it is taken again after it changes, or at the
    next start)."""
    if out.status == "ignored":
        remove_tree(out.work)
        log.warning("staged_set_ignored", staged_set=out.shown, reason="; ".join(out.reasons))
        return
    try:
        _file(staging, out, now)
    except Exception as exc:  # no set may stop the daemon
        _put_back(staging, out)
        log.error(
            "staged_set_ignored",
            staged_set=out.shown,
            status=out.status,
            reason=f"could not be filed ({_what(exc)}); it stays in {staging}",
        )
        return
    # The reason first, without the summary before it: the journal's MESSAGE lists the fields
    # in this order and is cut at its length limit, which must not fall on the reason.
    reasons = out.reasons[1:] if out.summary is not None and len(out.reasons) > 1 else out.reasons
    log.log(
        40 if out.status == "rejected" else 20,
        "staged_set_" + out.status,
        reason="; ".join(reasons),
        staged_set=out.shown,
        summary=out.summary,
        cert_path=str(out.filed_as),
        ca_generation=out.result.new_generation if out.result else None,
        force=out.force,
    )


_GONE = ".original"  # the original of a set, inside its filed dir until removed


def _file(staging: Path, out: StagingOutcome, now: datetime) -> None:
    """Everything is put together in out.work, the original set included (so it leaves the
    staging dir before its result shows up), then renamed into the bucket in one step."""
    bucket = REJECTED if out.status == "rejected" else APPLIED
    original = staging / out.name
    keep = out.status == "rejected" and out.keep_original and _small_enough(original)
    if out.status == "rejected":
        remove_tree(out.work / SET_DIR)  # a refused set is kept as found, not as copied
    try:
        os.rename(original, out.work / (SET_DIR if keep else _GONE))
    except FileNotFoundError:
        keep = False  # renamed away meanwhile
    if out.status == "rejected" and not keep:
        out.reasons.append(
            f"the set's content was not kept (over {KEEP_SET_BYTES >> 20} MiB, too many "
            "entries, or gone); only this result is"
        )
    doc = _result_doc(out, now)
    write_files(
        out.work,
        [
            FileWrite(out.work / "result.json", (json.dumps(doc, indent=2) + "\n").encode(), 0o600),
            FileWrite(out.work / "result.txt", _result_text(doc).encode(), 0o600),
        ],
    )
    ensure_dir(staging / bucket, 0o700)
    dest = _unique(staging / bucket / filed_name(out.name, now.strftime("%Y%m%dT%H%M%SZ")))
    move(out.work, dest)
    out.filed_as = dest
    if not remove_tree(dest / _GONE):
        log.warning("staged_set_not_removed", cert_path=str(dest / _GONE), reason="changing")
    prune(staging / bucket, KEEP_SETS[bucket], KEEP_BYTES[bucket])


def _put_back(staging: Path, out: StagingOutcome) -> None:
    """Filing failed: the original goes back where it was (taken again after it changes, or
    at the next start), the rest of the work dir is removed."""
    for part in (_GONE, SET_DIR):
        held = out.work / part
        if part == SET_DIR and out.status != "rejected":
            continue  # an applied set's copy, not the original
        try:
            os.rename(held, staging / out.name)
            break
        except OSError:
            continue
    remove_tree(out.work)


def _small_enough(path: Path) -> bool:
    """A non-directory entry staged as a set (a file, link, FIFO) is kept if it is small."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) or st.st_size <= KEEP_SET_BYTES


def clean_work(staging: Path) -> None:
    """Remove what a crash left in .work/ (copies and originals being removed): scratch."""
    work = staging / WORK
    try:
        names = os.listdir(work)
    except OSError:
        return
    for name in names:
        remove_tree(work / name)


def prune(bucket: Path, keep_sets: int, keep_bytes: int) -> list[Path]:
    """Remove the oldest filed sets beyond the newest `keep_sets`, or beyond `keep_bytes` in
    total (the newest is always kept). Returns what was removed."""
    try:
        entries = [(e.stat(follow_symlinks=False).st_mtime, e.name) for e in os.scandir(bucket)]
    except OSError:
        return []
    entries.sort(reverse=True)
    removed, total, full = [], 0, False
    for i, (_mtime, name) in enumerate(entries):
        path = bucket / name
        size = _tree_size(path)
        full = full or i >= keep_sets or (i > 0 and total + size > keep_bytes)
        if not full:
            total += size
            continue
        if remove_tree(path):
            removed.append(path)
            log.info(
                "staged_set_pruned",
                cert_path=str(path),
                reason=f"{bucket.name} keeps the newest {keep_sets} sets, {keep_bytes >> 20} MiB",
            )
    return removed


def _tree_size(path: Path) -> int:
    """Bytes of the regular files in a tree (links not followed)."""
    total, todo = 0, [path]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                todo.append(Path(e.path))
    return total


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate
