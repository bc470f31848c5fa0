"""Turning what happened into a rollout record: a CA generation saved in the datastore (by
`rotate-ca` or a staged set, on any server), or leaves renewed on one node."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from rke2certd.datastore.base import Datastore
from rke2certd.datastore.codec import BOOTSTRAP_FIELDS
from rke2certd.log import log
from rke2certd.plan.rollout import (
    PHASES,
    SERVER_PHASES,
    NodeState,
    NodeStatus,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
)
from rke2certd.rollout.cluster_store import ClusterStore

# Agents trust server-ca and hold certs signed by client-ca; nothing else of the CA set
# reaches them. A change elsewhere (the etcd CAs, request-header, service.key) restarts servers
# only: a service-key-only rotation needs no agent restart (docs/RKE2-COMPATIBILITY.md §10).
AGENT_FILES = frozenset(
    {"tls/server-ca.crt", "tls/server-ca.key", "tls/client-ca.crt", "tls/client-ca.key"}
)


@dataclass(frozen=True)
class RenewFacts:
    """What a renew did that decides its rollout (`RenewResult.rollout_facts()`)."""

    extracted: tuple[str, ...] = ()  # bootstrap fields taken from the datastore
    replaced: tuple[str, ...] = ()  # services whose loaded cert was replaced (not first issued)


@dataclass(frozen=True)
class RotationFacts:
    """What a CA rotation did that decides its rollout (`RotateCAResult.rollout_facts()`)."""

    saved: bool
    nothing_to_do: bool
    new_generation: str
    changed: tuple[str, ...]  # the `tls/...` paths it changed


def restart_phases(changed: Iterable[str] | None) -> tuple[Phase, ...]:
    """The phases that restart for a CA change, from the changed files (`tls/...` paths);
    None (not known what changed) restarts every phase."""
    if changed is None:
        return PHASES
    return PHASES if set(changed) & AGENT_FILES else SERVER_PHASES


def extracted_files(fields: Iterable[str]) -> list[str]:
    """Bootstrap field names (RenewResult.extracted) as `tls/...` paths."""
    return [BOOTSTRAP_FIELDS[f] for f in fields if f in BOOTSTRAP_FIELDS]


def ca_rollout(
    generation: str, changed: Iterable[str] | None, created_by: str, reason: str, now: datetime
) -> Rollout:
    return Rollout(
        id=f"ca-{generation}",
        kind=RolloutKind.CA,
        ca_generation=generation,
        phases=restart_phases(changed),
        nodes=None,
        state=RolloutState.ACTIVE,
        reason=reason,
        created=now,
        created_by=created_by,
    )


def renewal_rollout(
    node: str, phase: Phase, generation: str, reason: str, now: datetime
) -> Rollout:
    return Rollout(
        id=f"renewal-{node}-{now.strftime('%Y%m%dT%H%M%S%fZ')}",
        kind=RolloutKind.RENEWAL,
        ca_generation=generation,
        phases=(phase,),
        nodes=(node,),
        state=RolloutState.ACTIVE,
        reason=reason,
        created=now,
        created_by=node,
    )


def start(ds: Datastore, rollout: Rollout, now: datetime) -> tuple[Rollout, bool]:
    """Create the rollout if absent; log `rollout_started` only from the creator."""
    stored, created = ClusterStore(ds).create_rollout(rollout, now)
    if created:
        log.info(
            "rollout_started",
            rollout_id=stored.id,
            rollout_kind=stored.kind.value,
            ca_generation=stored.ca_generation,
            phase=stored.phases[0].value,
            phases=",".join(p.value for p in stored.phases),
            reason=stored.reason,
        )
    return stored, created


def after_renew(
    ds: Datastore,
    node: str,
    phase: Phase,
    facts: RenewFacts,
    before: str | None,
    after: str | None,
    why: str,
    now: datetime,
) -> Rollout | None:
    """The rollout a renew calls for, started if absent:

    - the CA generation on disk changed (taken from the datastore): a CA rollout for it (the
      server that saved it has usually started it already; this covers `rke2 certificate
      rotate-ca` run by hand, or a saver that died before starting it);
    - certificates RKE2 has loaded were replaced (not first issued): a renewal of this node.

    A node's first CA set (nothing on disk before) is not a change: RKE2 never ran with another.
    """
    if after is None or before is None:
        return None
    if before != after:
        changed = extracted_files(facts.extracted) or None
        reason = f"CA generation {after} taken from the datastore on {node} ({why})"
        return start(ds, ca_rollout(after, changed, node, reason, now), now)[0]
    replaced = sorted(set(facts.replaced))
    if not replaced:
        return None
    reason = f"certificates renewed on {node} ({why}): {', '.join(replaced)}"
    stored, created = start(ds, renewal_rollout(node, phase, after, reason, now), now)
    if created:  # the files are on disk already: applied
        ClusterStore(ds).set_status(
            stored, NodeStatus(node, NodeState.APPLIED, "renewed", after, now)
        )
    return stored


def after_rotation(
    ds: Datastore, node: str, facts: RotationFacts, why: str, now: datetime
) -> Rollout | None:
    """The CA rollout of a rotation that was just saved (rotate-ca or a staged set)."""
    if not facts.saved or facts.nothing_to_do:
        return None
    rollout = ca_rollout(facts.new_generation, facts.changed, node, why, now)
    return start(ds, rollout, now)[0]
