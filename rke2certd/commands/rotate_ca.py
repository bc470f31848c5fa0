"""`rke2certd certificate rotate-ca --path DIR`: check a staged CA set, save it to the datastore.

Runs on a server and saves directly (no HTTP hop to a supervisor). The current data is the
datastore's copy, the authority. Rejection changes nothing and reports every reason at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rke2certd.commands.bootstrap_write import save_rotation
from rke2certd.commands.renew import NeedsServerError
from rke2certd.datastore.base import Datastore
from rke2certd.datastore.codec import BOOTSTRAP_FIELDS, bootstrap_key_name, passphrase_from_token
from rke2certd.errors import TokenError, ValidationError
from rke2certd.log import log
from rke2certd.node.bootstrap_data import configured_token, load_value
from rke2certd.node.ca_material import ca_generation
from rke2certd.node.node import Node
from rke2certd.node.staged_read import read_staged_dir, staged_file_names
from rke2certd.pki import join_token as tokens
from rke2certd.pki.layout import CA_NAMES
from rke2certd.plan.staged_layout import layout_problems
from rke2certd.plan.staged_set import ROTATABLE, SERVICE_KEY, ca_cert_file, validate_staged_set

if TYPE_CHECKING:
    from rke2certd.rollout.create import RotationFacts

FIELD_OF = {rel: name for name, rel in BOOTSTRAP_FIELDS.items()}


@dataclass
class RotateCAResult:
    path: Path
    dry_run: bool
    force: bool
    saved: bool = False
    nothing_to_do: bool = False
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # problems skipped by --force
    old_generation: str = ""
    new_generation: str = ""
    old_hash: str = ""
    new_hash: str = ""
    # Printed for the operator when the CA hash changed; never logged.
    server_token: str = field(default="", repr=False)
    agent_token: str = field(default="", repr=False)

    def rollout_facts(self) -> RotationFacts:
        """What rollout/create.py decides the rollout of this rotation from."""
        from rke2certd.rollout.create import RotationFacts

        return RotationFacts(
            self.saved, self.nothing_to_do, self.new_generation, tuple(self.changed)
        )


def _generation(files: dict[str, bytes]) -> str:
    return ca_generation({ca: files[ca_cert_file(ca)] for ca in CA_NAMES}, files[SERVICE_KEY])


def rotate_ca(
    node: Node,
    path: Path,
    *,
    force: bool,
    dry_run: bool,
    now: datetime,
    datastore: Datastore,
    label: str | None = None,
) -> RotateCAResult:
    """`label` names the set in messages and logs instead of `path` (the daemon checks a private
    copy of a staged set, but the operator knows the set by its place in the staging dir)."""
    if not node.cfg.is_server:
        raise NeedsServerError("rotate-ca runs on a server (etcd or control-plane role)")
    token = configured_token(node.cfg, node.layout)
    if token is None:
        raise TokenError(
            "no server token: set `token`/`token-file`, or run on a server that has "
            f"{node.layout.server / 'token'}"
        )
    password = passphrase_from_token(token)
    staged = read_staged_dir(path, label=label)
    shown = label or str(path)
    layout = layout_problems(staged_file_names(path), shown)
    if layout:  # else every file would fall back to the current data: "nothing to do"
        log.error("rotate_ca_rejected", staged_set=shown, reason="; ".join(layout))
        raise ValidationError("the staged CA set was rejected, nothing changed", layout)
    kv = datastore.get(bootstrap_key_name(password))
    if kv is None or not kv.value:
        raise TokenError(
            f"no CA data in the datastore at {datastore.location} for this token; run "
            "`rke2certd renew` on a server first, or check the token"
        )
    stored = load_value(password, kv.value)
    current = {rel: stored[FIELD_OF[rel]].content for rel in ROTATABLE if FIELD_OF[rel] in stored}
    check = validate_staged_set(staged, current, now)
    result = RotateCAResult(path, dry_run, force, warnings=list(check.warnings))
    for w in check.warnings:
        log.warning("rotate_ca_warning", staged_set=shown, reason=w)
    result.old_generation = _generation(dict(current))
    result.old_hash = tokens.ca_hash(current[ca_cert_file("server-ca")])
    if check.nothing_to_do:
        result.nothing_to_do = True
        result.new_generation, result.new_hash = result.old_generation, result.old_hash
        log.info("rotate_ca_nothing_to_do", staged_set=shown, ca_generation=result.old_generation)
        return result
    error = check.error(force)
    if error is not None:
        log.error("rotate_ca_rejected", staged_set=shown, reason="; ".join(error.problems))
        raise error
    result.forced = [p.message for p in check.problems]
    for message in result.forced:
        log.warning("rotate_ca_forced", staged_set=shown, reason=message)
    result.changed = list(check.changed)
    new_files = dict(check.files)
    result.new_generation = _generation(new_files)
    result.new_hash = tokens.ca_hash(new_files[ca_cert_file("server-ca")])
    if result.new_hash != result.old_hash:
        result.server_token = tokens.format_token(result.new_hash, "server", password)
        result.agent_token = tokens.format_token(result.new_hash, "node", password)
    if dry_run:
        return result
    changed = {FIELD_OF[rel]: new_files[rel] for rel in check.changed}
    save_rotation(datastore, password, changed, now, read=kv)  # only over what was checked
    result.saved = True
    log.info(
        "ca_rotated",
        staged_set=shown,
        ca_generation=result.new_generation,
        old_generation=result.old_generation,
        changed=",".join(result.changed),
        forced=bool(result.forced),
        ca_hash_changed=result.new_hash != result.old_hash,
    )
    return result
