"""`rke2certd renew`, the startup hook: read the node, plan, write atomically, log each decision."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from rke2certd.errors import PKIError, Rke2certdError, ValidationError
from rke2certd.files.atomic import FileWrite, read_optional, recover, write_files
from rke2certd.log import log
from rke2certd.node.ca_material import (
    CA,
    CASet,
    load_ca_set,
    missing_ca_files,
    new_self_signed_set,
    new_service_key_pem,
)
from rke2certd.node.node import Node, check_dir_safety
from rke2certd.pki import build, certs, keys
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import (
    AGENT_UNIT,
    KUBECONFIGS,
    SERVER_UNIT,
    LeafSpec,
    leaves_for,
    wanted_sans,
)
from rke2certd.plan.renewal import Action, Decision, ObservedLeaf, Policy, Wanted, plan

if TYPE_CHECKING:
    from rke2certd.datastore.base import Datastore
    from rke2certd.rollout.create import RenewFacts


class NeedsServerError(Rke2certdError):
    """An agent-only node cannot sign its own certificates."""


@dataclass
class Change:
    path: Path
    service: str
    unit: str  # the RKE2 unit that must restart to load it
    action: str
    reasons: tuple[str, ...]
    old_serial: str | None = None
    new_serial: str | None = None
    old_not_after: datetime | None = None
    new_not_after: datetime | None = None
    new_key: bool = False


@dataclass
class RenewResult:
    dry_run: bool
    created_cas: bool = False
    extracted: list[str] = field(default_factory=list)  # bootstrap fields taken from the datastore
    token_files: list[Path] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    derived: list[Path] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unit: str = SERVER_UNIT  # this node's RKE2 unit
    # Why nothing was looked at (RKE2 has not started yet, or holds the CA set alone now).
    skipped: str | None = None

    @property
    def restart_units(self) -> list[str]:
        """RKE2 units that must restart to load what changed (a new CA or service key too)."""
        units = {c.unit for c in self.changes}
        if self.derived or self.extracted:
            units.add(self.unit)
        return sorted(units)

    def rollout_facts(self) -> RenewFacts:
        """What rollout/create.py decides the rollout of this renew from."""
        from rke2certd.rollout.create import RenewFacts  # only the daemon starts rollouts

        replaced = {c.service for c in self.changes if c.old_serial is not None}
        return RenewFacts(tuple(self.extracted), tuple(sorted(replaced)))


def read_key_public(path: Path) -> tuple[bytes | None, str | None]:
    data = read_optional(path)
    if data is None:
        return None, None
    try:
        return keys.public_der(keys.load_key(data, path)), None
    except PKIError as exc:
        return None, str(exc)


def observe(spec: LeafSpec, layout: Layout, ca_bundle: bytes) -> ObservedLeaf:
    """Read one leaf; a broken leaf becomes an observation (it gets re-issued), not an error.

    `ca_bundle` is the signer's CA file, which the leaf file must end with."""
    cert_path = spec.cert_path(layout)
    key_public, key_error = read_key_public(spec.key_path(layout))
    data = read_optional(cert_path)
    if data is None:
        return ObservedLeaf(spec, key_public=key_public, key_error=key_error)
    try:
        bundle = certs.load_bundle(data, cert_path)
    except PKIError as exc:
        return ObservedLeaf(spec, cert_error=str(exc), key_public=key_public, key_error=key_error)
    if certs.is_ca(bundle[0]):
        err = f"{cert_path}: the first certificate is a CA, not a leaf"
        return ObservedLeaf(spec, cert_error=err, key_public=key_public, key_error=key_error)
    chain_current = data == certs.bundle_pem(bundle[:1]) + ca_bundle
    return ObservedLeaf(spec, bundle[0], None, chain_current, key_public, key_error)


def wanted(spec: LeafSpec, node: Node, ca_cert: x509.Certificate) -> Wanted:
    """What the leaf should say; `ca_cert` is its signer (the first cert of the CA file)."""
    return Wanted(
        cn=spec.common_name(node.ident.node_name),
        orgs=spec.orgs,
        sans=wanted_sans(spec, node.ident),
        ca_ski=certs.ski(ca_cert),
    )


def _issue(
    decision: Decision, node: Node, ca: CA, now: datetime
) -> tuple[list[FileWrite], x509.Certificate]:
    spec = decision.spec
    key_path, cert_path = spec.key_path(node.layout), spec.cert_path(node.layout)
    key: keys.PrivateKey
    writes: list[FileWrite] = []
    existing = None if decision.new_key else read_optional(key_path)
    if existing is not None:
        key = keys.load_key(existing, key_path)
    else:
        key = keys.new_ec_key()
        writes.append(FileWrite(key_path, keys.key_to_pem(key), 0o600))
    want = wanted(spec, node, ca.cert)
    cert = build.leaf(
        want.cn, want.orgs, spec.usage, want.sans, key.public_key(), ca.cert, ca.key, now
    )
    writes.append(FileWrite(cert_path, certs.bundle_pem([cert]) + ca.bundle, 0o644))
    return writes, cert


def _unit(node: Node) -> str:
    # On a server, the kubelet and every agent cert are loaded by rke2-server itself.
    return SERVER_UNIT if node.cfg.is_server else AGENT_UNIT


Obtain = Callable[[], tuple[list[FileWrite], x509.Certificate]]


def apply_decision(
    d: Decision, node: Node, *, unit: str, bundle: bytes, obtain: Obtain, dry_run: bool
) -> Change:
    """Carry out one non-KEEP decision and log it. `obtain` makes the new cert (and key) writes:
    signed locally on a server, through a server's endpoint on an agent; `bundle` is the CA
    file a leaf file ends with."""
    spec = d.spec
    cert_path = spec.cert_path(node.layout)
    change = Change(
        cert_path,
        spec.service,
        unit,
        d.action.value,
        d.reasons,
        d.old_serial,
        None,
        d.old_not_after,
        None,
        d.new_key,
    )
    if not dry_run:
        if d.action is Action.RECHAIN:
            cert = certs.load_bundle(cert_path.read_bytes(), cert_path)[0]
            data = certs.bundle_pem([cert]) + bundle
            write_files(node.layout.data_dir, [FileWrite(cert_path, data, 0o644)])
        else:
            writes, cert = obtain()
            write_files(node.layout.data_dir, writes)
            change.new_serial = certs.serial_hex(cert)
            change.new_not_after = certs.not_after(cert)
    log.info(
        "cert_renewed" if d.action is Action.ISSUE else "cert_rechained",
        cert_path=str(cert_path),
        cert_service=spec.service,
        reason="; ".join(d.reasons),
        cert_serial=change.new_serial,
        old_serial=d.old_serial,
        cert_not_after=_iso(change.new_not_after),
        old_not_after=_iso(d.old_not_after),
        new_key=d.new_key,
        dry_run=dry_run,
    )
    return change


def apply_decisions(
    decisions: Iterable[Decision], node: Node, cas: dict[str, CA], now: datetime, dry_run: bool
) -> list[Change]:
    changes = []
    for d in decisions:
        if d.action is Action.KEEP:
            continue
        ca = cas[d.spec.signer]
        obtain = partial(_issue, d, node, ca, now)
        changes.append(
            apply_decision(
                d, node, unit=_unit(node), bundle=ca.bundle, obtain=obtain, dry_run=dry_run
            )
        )
    return changes


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def ensure_cas(
    node: Node, now: datetime, dry_run: bool, may_create: bool = True
) -> tuple[CASet | None, bool]:
    """Use the CA files on disk, or create RKE2's self-signed set when there are none (only
    when `may_create`: a standalone node; on an RKE2 node RKE2 makes and owns the set, and a
    missing or partial set is (None, False): RKE2 restores it from its datastore at start)."""
    layout = node.layout
    present, missing = missing_ca_files(layout)
    created = False

    if not may_create and (missing or read_optional(layout.service_key) is None):
        return None, False
    if present and missing:
        raise ValidationError(
            f"incomplete custom CA set in {layout.tls}: these files are missing or empty; "
            "add them (see `rke2certd ca generate-custom`) or remove the partial set",
            [str(p) for p in missing],
        )
    if not present:
        created = True
        log.info("ca_created", cert_path=str(layout.tls), reason="no CA files", dry_run=dry_run)
        if dry_run:
            return None, True
        writes = new_self_signed_set(layout, now)
        if read_optional(layout.service_key) is None:
            writes.append(FileWrite(layout.service_key, new_service_key_pem(), 0o600))
        write_files(layout.data_dir, writes)
    elif read_optional(layout.service_key) is None and not dry_run:
        log.info("service_key_created", cert_path=str(layout.service_key), reason="missing")
        write_files(layout.data_dir, [FileWrite(layout.service_key, new_service_key_pem(), 0o600)])
    return load_ca_set(layout), created


def rke2_has_run(layout: Layout) -> bool:
    """RKE2 has started on this node at least once: it wrote its token (every server) or its
    etcd member's data. Before that it creates (first server) or fetches (joining server)
    the CA set itself, with every certificate: there is nothing for rke2certd to do."""
    server = layout.server
    return (
        (server / "token").is_file()
        or (server / "cred" / "passwd").is_file()
        or (server / "db" / "etcd").is_dir()
    )


def before_first_start(node: Node, *, dry_run: bool) -> RenewResult | None:
    """The result of a renew on an RKE2 node RKE2 never ran on (None: it has run, or the node
    is standalone): nothing to do, said once in the journal."""
    if node.cfg.rke2_config is None:
        return None
    if node.cfg.is_server:
        if rke2_has_run(node.layout):
            return None
        why = BEFORE_FIRST_START
    else:
        if rke2_agent_has_run(node.layout):
            return None
        why = AGENT_BEFORE_FIRST_START
    log.info("renew_skipped", reason=why, dry_run=dry_run)
    return RenewResult(dry_run=dry_run, unit=_unit(node), skipped=why)


def rke2_agent_has_run(layout: Layout) -> bool:
    """rke2-agent (or rke2certd) has put the agent's certificates and kubeconfig in place."""
    agent = layout.agent
    return (agent / "client-kubelet.crt").is_file() or (agent / "kubelet.kubeconfig").is_file()


AGENT_BEFORE_FIRST_START = (
    "rke2-agent has not started on this node yet: at its first start it gets the CA and its "
    "certificates from `server`; rke2certd renews from then on"
)


BEFORE_FIRST_START = (
    "RKE2 has not started on this node yet: at its first start it creates the CA set (a first "
    "server) or fetches it from `server` (a joining server), with every certificate; "
    "rke2certd renews from then on"
)
NO_CA_SET = (
    "the CA set on disk is missing or incomplete and RKE2's datastore did not provide it: "
    "RKE2 restores it from its datastore at its start; rke2certd renews once it is there"
)


def derived_files(node: Node, ca_set: CASet) -> list[FileWrite]:
    """Files RKE2 derives from the CA set at every start."""
    layout = node.layout
    out = [
        FileWrite(layout.nochain(name), certs.bundle_pem(ca_set.cas[name].certs[:1]), 0o644)
        for name in ("server-ca", "client-ca")
    ]
    if ca_set.service_keys:
        first = keys.key_to_pem(ca_set.service_keys[0])
        out.append(FileWrite(layout.service_current_key, first, 0o600))
    if node.cfg.is_server:
        out += [
            FileWrite(layout.kubeconfig(name), kubeconfig(layout, leaf), 0o600)
            for name, leaf in KUBECONFIGS.items()
        ]
    if node.cfg.has_agent:
        out.append(FileWrite(layout.agent_server_ca, ca_set.cas["server-ca"].bundle, 0o644))
        out.append(FileWrite(layout.agent_client_ca, ca_set.cas["client-ca"].bundle, 0o644))
    return out


APISERVER_URL = "https://127.0.0.1:6443"


def kubeconfig(layout: Layout, leaf: str) -> bytes:
    """A kubeconfig pointing at the files, as RKE2 writes server/cred/*.kubeconfig."""
    tls = layout.tls
    return kubeconfig_naming(layout.ca_cert("server-ca"), tls / f"{leaf}.crt", tls / f"{leaf}.key")


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+=,@~-]*")


def yaml_path(path: Path) -> str:
    """A path as a YAML scalar: as is when YAML reads it back unchanged (an absolute path of
    plain characters: RKE2's own layout), else double-quoted. JSON's quoting is valid YAML, so a
    data dir with `: `, `#`, quotes or spaces in it still gives the path, without importing a
    YAML library on the startup hook's path."""
    text = str(path)
    return text if _PLAIN_PATH.fullmatch(text) else json.dumps(text)


def kubeconfig_naming(ca: Path, cert: Path, key: Path) -> bytes:
    """RKE2's kubeconfig layout for a client that names its CA, cert and key files (as in
    server/cred/ and agent/)."""
    ca_s, cert_s, key_s = yaml_path(ca), yaml_path(cert), yaml_path(key)
    return (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    server: {APISERVER_URL}\n"
        f"    certificate-authority: {ca_s}\n"
        "  name: local\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: local\n"
        "    namespace: default\n"
        "    user: user\n"
        "  name: Default\n"
        "current-context: Default\n"
        "kind: Config\n"
        "preferences: {}\n"
        "users:\n"
        "- name: user\n"
        "  user:\n"
        f"    client-certificate: {cert_s}\n"
        f"    client-key: {key_s}\n"
    ).encode()


def renew(
    node: Node,
    now: datetime,
    *,
    dry_run: bool = False,
    force: frozenset[str] = frozenset(),
    specs: tuple[LeafSpec, ...] | None = None,
    datastore: Datastore | None = None,
) -> RenewResult:
    """The startup hook. The caller holds the node lock.

    With a datastore, the CA set is the datastore's (created there by the first server);
    without one, the CA files on disk are used as they are (or created).
    """
    cfg, layout = node.cfg, node.layout
    if not cfg.is_server:
        raise NeedsServerError(
            "this node has only the agent role: its certificates must be signed by a server; "
            "run `rke2certd renew` on a server (etcd or control-plane role), or add a server "
            "role in `roles`"
        )
    rke2 = cfg.rke2_config is not None  # RKE2 owns the CA set: never create one here
    skipped = before_first_start(node, dry_run=dry_run)
    if skipped is not None:
        return skipped
    result = RenewResult(dry_run=dry_run, unit=_unit(node))
    check_dir_safety(node.key_dirs())
    if not dry_run:
        result.repaired = recover(layout.data_dir, node.write_dirs())
        for what in result.repaired:
            log.warning("write_repaired", reason=what)
    if datastore is not None:
        from rke2certd.commands.bootstrap_write import ensure_bootstrap

        outcome = ensure_bootstrap(
            node,
            datastore,
            now,
            lambda: ensure_cas(node, now, dry_run),
            dry_run=dry_run,
            may_create=not rke2,
        )
        result.extracted, result.token_files = outcome.extracted, outcome.token_files
        result.created_cas = outcome.created
    if dry_run and result.extracted:
        ca_set = None  # the CAs would change: every leaf would be re-issued
    else:
        ca_set, created = ensure_cas(node, now, dry_run, may_create=not rke2)
        result.created_cas = result.created_cas or created
        if ca_set is None and rke2:
            result.skipped = NO_CA_SET
            log.warning("renew_skipped", reason=NO_CA_SET, dry_run=dry_run)
            return result
    all_specs = specs if specs is not None else leaves_for(cfg.is_server, cfg.has_agent)
    if ca_set is None:  # dry run on an empty node: everything would be created
        result.changes = [
            Change(s.cert_path(layout), s.service, _unit(node), "issue", ("missing",), new_key=True)
            for s in all_specs
        ]
        return result
    policy = Policy(timedelta(days=cfg.renew_before_days), force)
    observed = [
        (
            observe(s, layout, ca_set.cas[s.signer].bundle),
            wanted(s, node, ca_set.cas[s.signer].cert),
        )
        for s in all_specs
    ]
    decisions = plan(observed, now, policy)
    result.changes = apply_decisions(decisions, node, ca_set.cas, now, dry_run)
    derived = derived_files(node, ca_set)
    if dry_run:
        result.derived = [fw.path for fw in derived if _differs(fw)]
    else:
        for fw in derived:
            if write_files(layout.data_dir, [fw]):
                result.derived.append(fw.path)
    return result


def _differs(fw: FileWrite) -> bool:
    try:
        st = fw.path.stat()
    except FileNotFoundError:
        return True
    return (st.st_mode & 0o7777) != fw.mode or fw.path.read_bytes() != fw.data
