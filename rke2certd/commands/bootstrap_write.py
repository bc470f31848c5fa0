"""The CA authority in the datastore: create, or extract and reconcile, the bootstrap key.

The datastore holds the authoritative CA set (docs/RKE2-COMPATIBILITY.md §6). A server with no
bootstrap key takes the empty-value creation lock, builds the set (custom files on disk, or new
self-signed CAs) and saves it; every other server, including those that start at the same moment,
waits for the value and extracts it. The lock is bound to a short lease so that a creator that dies
does not block the cluster forever.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

from rke2certd.datastore.base import KV, Datastore, OutcomeUnknown
from rke2certd.datastore.codec import (
    BOOTSTRAP_FIELDS,
    BOOTSTRAP_PREFIX,
    WRONG_TOKEN,
    BootstrapFile,
    bootstrap_key_name,
    passphrase_from_token,
)
from rke2certd.errors import DatastoreError, TokenError, ValidationError
from rke2certd.files.atomic import (
    FileWrite,
    read_optional,
    remove_file,
    write_file,
    write_files,
    write_if_changed,
)
from rke2certd.log import log
from rke2certd.node.bootstrap_data import (
    configured_token,
    disk_bootstrap,
    load_value,
    plan_extract,
    save_value,
)
from rke2certd.node.node import Node
from rke2certd.pki import join_token as tokens
from rke2certd.pki.layout import Layout

CREATION_LOCK_TTL = 60  # seconds a dead creator can hold the others up
WAIT_FOR_CREATOR = 120.0


@dataclass
class BootstrapOutcome:
    created: bool = False  # this server created and saved the CA set
    extracted: list[str] = field(default_factory=list)  # fields written to disk
    token_generated: bool = False
    token_files: list[Path] = field(default_factory=list)


def _mode(rel: str) -> int:
    return 0o644 if rel.endswith(".crt") else 0o600


class _Superseded(Exception):
    """The bootstrap key changed between the read an extract was planned on and its write."""


def extract(
    layout: Layout,
    files: dict[str, BootstrapFile],
    dry_run: bool,
    still_current: Callable[[], bool] | None = None,
) -> list[str]:
    """Write the datastore's copy to disk by the rules of docs/RKE2-COMPATIBILITY.md §6, as one
    all-or-nothing change.

    `still_current` is asked right before anything is written: False (a rotation was saved
    since the read) raises _Superseded, so an older CA set is never written over the newer
    one RKE2 may be writing at its start; the caller reads the key again."""
    plan = plan_extract(layout, files)
    if plan.conflicts:
        raise ValidationError(
            "files on disk are newer than the datastore's copy and differ from it; rke2certd "
            "will not overwrite them. If you meant to change the CAs, put the files in a "
            "staging dir and run `rke2certd certificate rotate-ca --path DIR`; to take the "
            "datastore's copy instead, move these files away and run again",
            [
                f"{c.path} (modified {c.disk_mtime.isoformat()}, datastore copy from "
                f"{c.stored_timestamp.isoformat()})"
                for c in plan.conflicts
            ],
        )
    # Each file gets its field's Timestamp as mtime, as RKE2 writes them: a file rke2certd
    # wrote is then never "newer than the datastore" to RKE2's reconcile, whatever the delay.
    writes = [
        FileWrite(
            layout.server / BOOTSTRAP_FIELDS[name],
            data,
            _mode(BOOTSTRAP_FIELDS[name]),
            files[name].unix_ns,
        )
        for name, data in plan.writes.items()
        if name in BOOTSTRAP_FIELDS
    ]
    if writes and not dry_run:
        if still_current is not None and not still_current():
            raise _Superseded
        write_files(layout.data_dir, writes)
    for name in plan.writes:
        log.info(
            "bootstrap_extracted",
            cert_path=str(layout.server / BOOTSTRAP_FIELDS.get(name, name)),
            reason="restore of an empty tls dir" if plan.full_restore else "datastore copy differs",
            dry_run=dry_run,
        )
    return sorted(plan.writes)


def _wait_for_value(ds: Datastore, key: str, deadline: float) -> None:
    """Wait (with a watch, not a poll loop) until the creator fills or drops its lock."""
    kv = ds.get(key)
    while kv is not None and not kv.value:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DatastoreError(
                f"another server has held the bootstrap creation lock for more than "
                f"{WAIT_FOR_CREATOR:.0f}s; it may have died while creating the CAs. Its lock "
                f"expires with its lease ({CREATION_LOCK_TTL}s); run again"
            )
        log.info("bootstrap_waiting", reason="another server is creating the CA set")
        ds.watch_prefix(key, kv.mod_revision + 1, min(remaining, 5.0))
        kv = ds.get(key)


def ensure_bootstrap(
    node: Node,
    ds: Datastore,
    now: datetime,
    create_cas: Callable[[], object],
    *,
    dry_run: bool = False,
    may_create: bool = True,
) -> BootstrapOutcome:
    """Make disk and datastore agree on one CA set; `create_cas` builds it on disk if needed.

    Without `may_create` (RKE2's datastore: RKE2 creates and saves the set) an absent key is
    left alone: nothing is created, nothing taken."""
    layout = node.layout
    outcome = BootstrapOutcome()
    token = configured_token(node.cfg, layout)
    if token is None and not may_create:
        raise TokenError(
            f"no server token on this node: RKE2 writes {layout.server / 'token'} at its start; "
            "set `token` in RKE2's config (or rke2certd's) to the cluster's server token"
        )
    if token is None:
        if ds.get_prefix(BOOTSTRAP_PREFIX):
            raise TokenError(
                f"the datastore at {ds.location} already holds a cluster's CA data, but no token "
                "is configured; set `token` (or `token-file`) to that cluster's server token"
            )
        password = tokens.new_password()
        outcome.token_generated = True
    else:
        password = passphrase_from_token(token)
    key = bootstrap_key_name(password)
    if not dry_run:
        _release_stale_lock(ds, layout)
    deadline = time.monotonic() + WAIT_FOR_CREATOR
    while True:
        kv = ds.get(key)
        if kv is not None and kv.value:
            try:
                files = load_value(password, kv.value)
                unchanged = partial(_unchanged, ds, key, kv.mod_revision)
                outcome.extracted = extract(layout, files, dry_run, unchanged)
            except _Superseded:
                log.info("bootstrap_superseded", reason="a newer CA set was saved meanwhile")
                continue
            break
        if kv is not None:
            _wait_for_value(ds, key, deadline)
            continue
        _refuse_other_keys(ds, key)
        if not may_create:
            log.warning(
                "bootstrap_not_saved",
                datastore=ds.location,
                reason="RKE2 has not saved its bootstrap data yet; the CA set on disk is used",
            )
            return outcome
        if dry_run:
            create_cas()  # the dry-run callback only reports
            outcome.created = True
            break
        if _create(ds, key, password, layout, create_cas):
            outcome.created = True
            break
    if not dry_run:
        outcome.token_files = write_tokens(layout, password, rke2_owned=not may_create)
    return outcome


def _unchanged(ds: Datastore, key: str, mod_revision: int) -> bool:
    kv = ds.get(key)
    return kv is not None and kv.mod_revision == mod_revision


def _refuse_other_keys(ds: Datastore, key: str) -> None:
    """Our token's key is absent but the store holds another: as upstream, that is the data of
    a cluster made with another token, never a reason to create a second CA set."""
    if any(kv.key != key for kv in ds.get_prefix(BOOTSTRAP_PREFIX)):
        raise TokenError(
            f"{WRONG_TOKEN}: the datastore at {ds.location} holds CA data that this node's token "
            "does not open; set `token` (or `token-file`) to the server token the cluster was "
            "created with. Nothing was changed"
        )


def _lock_marker(layout: Layout) -> Path:
    """Where a creator notes its lock's lease before taking the lock (rke2certd's own state)."""
    return layout.server / "db" / "bootstrap-lock.json"


def _release_stale_lock(ds: Datastore, layout: Layout) -> None:
    """End the lease of a creation lock that an earlier run of this node left behind (it died,
    or lost the datastore, while creating): otherwise every server would wait for it to expire."""
    path = _lock_marker(layout)
    data = read_optional(path)
    if data is None:
        return
    try:
        doc = json.loads(data)
        lease, where = int(doc["lease"]), str(doc["datastore"])
    except (ValueError, KeyError, TypeError):
        lease, where = 0, ""
    if lease and where == ds.location and ds.revoke_lease(lease):
        log.warning(
            "bootstrap_lock_released",
            reason="an earlier run of this node stopped while holding the creation lock",
            datastore=ds.location,
        )
    remove_file(path)


def _create(
    ds: Datastore, key: str, password: str, layout: Layout, create_cas: Callable[[], object]
) -> bool:
    """Take the creation lock and save the CA set; False if another server got there first."""
    lease = ds.grant_lease(CREATION_LOCK_TTL)
    marker = _lock_marker(layout)
    write_file(marker, json.dumps({"lease": lease, "datastore": ds.location}).encode(), 0o600)
    try:
        created = ds.create(key, b"", lease=lease)
    except OutcomeUnknown:  # the answer was lost (an etcd member died): is the lock ours?
        kv = ds.get(key)
        created = kv is not None and not kv.value and kv.lease == lease
    if not created:
        ds.revoke_lease(lease)
        remove_file(marker)
        return False
    locked = ds.get(key)
    try:
        _refuse_other_keys(ds, key)  # another token's first server took its lock meanwhile
        create_cas()
        value = save_value(password, disk_bootstrap(layout))
        if locked is None or not _swap(ds, key, value, locked.mod_revision):
            raise DatastoreError(
                "lost the bootstrap creation lock while saving (the datastore was too slow, or "
                "the lock expired); run again: the CA set on disk will be reconciled"
            )
    except BaseException:
        if locked is not None:  # never delete without the compare: it may be another's value
            ds.delete(key, locked.mod_revision)
        raise
    finally:
        ds.revoke_lease(lease)  # the saved value was written without it, so it stays
        remove_file(marker)
    log.info("bootstrap_saved", reason="first server: CA set created", datastore=ds.location)
    return True


def _swap(ds: Datastore, key: str, value: bytes, expected_mod_revision: int) -> bool:
    """compare_and_swap; when the answer was lost, the key tells: every value is unique (fresh
    salt and nonce), so finding ours there means our write was applied."""
    try:
        return ds.compare_and_swap(key, value, expected_mod_revision)
    except OutcomeUnknown:
        kv = ds.get(key)
        if kv is not None and kv.value == value:
            return True
        raise


def write_tokens(layout: Layout, password: str, rke2_owned: bool = False) -> list[Path]:
    """`server/token` and `server/agent-token` with the current CA hash
    (docs/RKE2-COMPATIBILITY.md §7).

    On an RKE2 node (`rke2_owned`) `agent-token` stays as RKE2 keeps it: a link to `token` is
    left alone (it follows it), a file of its own (a separate agent token) keeps its user and
    password with the new CA hash, and a missing one is left to RKE2's next start."""
    bundle = read_optional(layout.ca_cert("server-ca"))
    if not bundle:
        return []
    ca_hash = tokens.ca_hash(bundle)
    changed = []
    for name, user in (("token", "server"), ("agent-token", "node")):
        path = layout.server / name
        secret = password
        if name == "agent-token" and rke2_owned:
            current = read_optional(path)
            if path.is_symlink() or current is None:
                continue
            try:
                parsed = tokens.parse_token(current.decode())
            except (TokenError, UnicodeDecodeError):
                parsed = None
            if parsed is not None and parsed.username:
                user, secret = parsed.username, parsed.password
        data = (tokens.format_token(ca_hash, user, secret) + "\n").encode()
        if write_if_changed(path, data, 0o600):
            changed.append(path)
            log.info("token_written", cert_path=str(path), reason="CA hash or password changed")
    return changed


def save_rotation(
    ds: Datastore,
    password: str,
    new_files: dict[str, bytes],
    now: datetime,
    read: KV | None = None,
) -> tuple[int, dict[str, BootstrapFile]]:
    """Replace rotatable fields in the stored set with compare-and-swap; other fields are kept.

    `read` is the value the new files were checked against: the swap succeeds only if the key
    still holds it, so a rotation saved meanwhile (upstream's `rotate-ca`, another server) is
    never overwritten by one checked against the older CAs. Changed fields get `now` as their
    Timestamp so that every server takes them at its next start (the datastore wins over an
    older file). Returns the new revision and the stored set.
    """
    key = bootstrap_key_name(password)
    kv = read if read is not None else ds.get(key)
    if kv is None or not kv.value:
        raise DatastoreError(
            "no CA data in the datastore for this token; run `rke2certd renew` on a server first"
        )
    files = load_value(password, kv.value)
    for name, content in new_files.items():
        old = files.get(name)
        if old is None or old.content != content:
            files[name] = BootstrapFile(now, content)
    if not _swap(ds, key, save_value(password, files), kv.mod_revision):
        raise DatastoreError(
            "the CA data changed in the datastore while it was being saved (another rotation?); "
            "nothing was saved; check `rke2certd certificate check` and run again"
        )
    saved = ds.get(key)
    return (saved.mod_revision if saved else 0), files
