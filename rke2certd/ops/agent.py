"""`renew` and `certificate rotate` on agent-only nodes: local keys, certs signed by a server.

The decisions are a server's (`plan.renewal.decide`); only the signing differs: a CSR for the
local key goes to a server's endpoint (`rke2certd.supervisor`), which signs it with its CA. The
CAs come from the server too: `agent/server-ca.crt` is `/cacerts`, pinned by the token's CA
hash; `agent/client-ca.crt` is `GET /v1-rke2/client-ca.crt` over the pinned channel. That is a
request of its own rather than the chain of client-kubelet's answer, so that the copy is
current even when no leaf needs a new cert, and so that the AKI check can use it before deciding.

Servers: RKE2's `server` (a comma list is allowed) with the port replaced by `supervisor-port`,
since RKE2's own supervisor keeps 9345. Token: `token` / `token-file`. Every answer is checked
before anything is written: the key must match, the cert must chain to the fetched CA and fit
the profile the planner wants (so a misbehaving server cannot plant a wrong cert).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from rke2certd.config import Config
from rke2certd.constants import RKE2_SUPERVISOR_PORT
from rke2certd.errors import ConfigError, PKIError, UsageError
from rke2certd.log import log
from rke2certd.ops.bootstrap import configured_token
from rke2certd.ops.node import Node, check_dir_safety
from rke2certd.ops.renew import Change, RenewResult, apply_decision, observe, wanted
from rke2certd.ops.rotate import RotateResult
from rke2certd.pki import certs, keys
from rke2certd.pki.chain import verify_chain
from rke2certd.pki.profiles import AGENT_LEAVES, AGENT_UNIT, LeafSpec, by_service
from rke2certd.plan.renewal import Action, Decision, ObservedLeaf, Policy, Wanted, decide, plan
from rke2certd.store.atomic import (
    FileWrite,
    create_file,
    ensure_dir,
    read_optional,
    recover,
    write_files,
)
from rke2certd.store.exposure import warn_if_exposed
from rke2certd.supervisor import cert_route
from rke2certd.supervisor.choice import preferred_order
from rke2certd.supervisor.client import (
    SupervisorError,
    fetch_client_ca,
    locate_cacerts,
    request_cert,
)

AGENT_SERVICES = ("kubelet", "kube-proxy", "rke2-controller")


@dataclass(frozen=True)
class Upstream:
    """The servers to ask, the token, and the two CA bundles they serve (already pinned)."""

    urls: list[str]
    token: str = field(repr=False)  # a secret: never in a repr or a log
    bundles: dict[str, bytes]  # "server-ca" / "client-ca" -> the bundle's bytes
    chains: dict[str, list[x509.Certificate]]


def supervisor_urls(cfg: Config) -> list[str]:
    """`server` URLs, each with the port set to `supervisor-port`, ranked for this node: its
    preferred server first, then its fail-over order (supervisor/choice.py spreads the fleet)."""
    if not cfg.server:
        raise ConfigError(
            "this agent-only node does not know its servers",
            [
                "server: set it to the RKE2 server URL, e.g. "
                f"https://server-1:{RKE2_SUPERVISOR_PORT} (comma list)"
            ],
        )
    urls: dict[str, str] = {}  # as configured -> on supervisor-port
    problems = []
    for raw in (u.strip() for u in cfg.server.split(",")):
        parts = urlsplit(raw)
        if parts.scheme != "https" or not parts.hostname:
            problems.append(f"server: {raw!r} is not an https:// URL with a host")
            continue
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        urls[raw] = f"https://{host}:{cfg.supervisor_port}"
    if problems or not urls:
        raise ConfigError("invalid server URL", problems or ["server: no URL given"])
    # ranked by the URLs as configured: the same choice whatever port the endpoint uses
    ranked = [urls[raw] for raw in preferred_order(list(urls), cfg.node)]
    return list(dict.fromkeys(ranked))


def agent_token(node: Node) -> str:
    token = configured_token(node.cfg, node.layout)
    if not token:
        raise ConfigError(
            "no join token for this agent",
            [
                "token or token-file: set it to the server's agent token "
                "(<data>/server/agent-token on a server)"
            ],
        )
    return token


def node_password(node: Node) -> str:
    """This agent's node password (`node-password-file`, RKE2's `/etc/rancher/node/password`):
    read, or created at first need as RKE2's agent does (128 random bits as hex, mode 0600). It
    proves the node's name to the servers, which refuse another password for a name they know,
    so an existing file is never replaced, and of two processes creating it at once one wins."""
    path = node.cfg.node_password_file
    try:
        existing = read_optional(path)
        if existing is None:
            ensure_dir(path.parent, 0o755)  # as RKE2: the file itself is 0600
            create_file(path, (secrets.token_hex(16) + "\n").encode(), 0o600)
            existing = path.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "cannot read this node's password",
            [f"node-password-file {path}: {getattr(exc, 'strerror', None) or exc}"],
        ) from exc
    warn_if_exposed(path, "the node password file (node-password-file)")
    password = existing.decode(errors="replace").strip()
    if not password or not password.isprintable():
        raise ConfigError(
            "this node's password file is unusable",
            [
                f"node-password-file {path}: empty or not text; restore it from a backup (the "
                "servers know this node by it) or remove the node with `rke2certd node remove` "
                "and the file, to register afresh"
            ],
        )
    return password


def _ca_chain(data: bytes, name: str) -> list[x509.Certificate]:
    chain = certs.load_bundle(data, f"the server's {name}.crt")
    if not certs.is_ca(chain[0]):
        raise PKIError(f"the server's {name}.crt does not start with a CA certificate")
    return chain


def connect(node: Node, token: str | None = None) -> Upstream:
    """Pin the server CA by the token, then fetch the client CA over the pinned channel.
    `token`: instead of the configured one (a daemon that has just adopted a rotated CA)."""
    urls, token = supervisor_urls(node.cfg), token or agent_token(node)
    pinned_url, server_ca = locate_cacerts(urls, token)
    urls = [pinned_url] + [u for u in urls if u != pinned_url]  # ask the pinned server first
    client_ca = fetch_client_ca(urls, token, server_ca)
    bundles = {"server-ca": server_ca, "client-ca": client_ca}
    chains = {name: _ca_chain(data, name) for name, data in bundles.items()}
    return Upstream(urls, token, bundles, chains)


# Observe and decide (the planner is the server's) -------------------------------------------


def _wanted(spec: LeafSpec, node: Node, up: Upstream) -> Wanted:
    return wanted(spec, node, up.chains[spec.signer][0])


# Obtain a cert from the server ---------------------------------------------------------------


def _csr(key: keys.PrivateKey, cn: str) -> bytes:
    # The server ignores the subject; it is set only so that the CSR reads sensibly.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def _check_answer(
    spec: LeafSpec, answer: bytes, key: keys.PrivateKey, want: Wanted, up: Upstream, now: datetime
) -> x509.Certificate:
    source = f"the server's answer to {cert_route(spec.name)}"
    leaf = certs.load_bundle(answer, source)[0]
    problems: list[str] = []
    if certs.is_ca(leaf):
        problems.append("it is a CA certificate")
    try:
        verify_chain(leaf, up.chains[spec.signer], (), now)
    except PKIError as exc:
        problems.append(str(exc))
    observed = ObservedLeaf(spec, leaf, None, True, keys.public_der(key))
    problems += decide(observed, want, now, Policy(timedelta(0))).reasons
    if problems:
        raise SupervisorError(f"{source} is unusable, nothing was written: {'; '.join(problems)}")
    return leaf


def _obtain(
    decision: Decision, node: Node, up: Upstream, now: datetime
) -> tuple[list[FileWrite], x509.Certificate]:
    spec, layout = decision.spec, node.layout
    key_path = spec.key_path(layout)
    existing = None if decision.new_key else read_optional(key_path)
    key = keys.load_key(existing, key_path) if existing is not None else keys.new_ec_key()
    key_pem = existing if existing is not None else keys.key_to_pem(key)
    want = _wanted(spec, node, up)
    answer = request_cert(
        up.urls,
        up.token,
        up.bundles["server-ca"],
        cert_route(spec.name),
        _csr(key, want.cn),
        node.ident.node_name,
        node.ident.node_ips,
        node_password=node_password(node),
    )
    cert = _check_answer(spec, answer, key, want, up, now)
    chain = certs.bundle_pem([cert]) + up.bundles[spec.signer]
    # The key is listed even when kept: write_files skips it unless its mode is looser.
    return [FileWrite(key_path, key_pem, 0o600), FileWrite(spec.cert_path(layout), chain)], cert


def _apply(decision: Decision, node: Node, up: Upstream, now: datetime, dry_run: bool) -> Change:
    return apply_decision(
        decision,
        node,
        unit=AGENT_UNIT,
        bundle=up.bundles[decision.spec.signer],
        obtain=lambda: _obtain(decision, node, up, now),
        dry_run=dry_run,
    )


def _ca_copies(node: Node, up: Upstream, dry_run: bool) -> list[Path]:
    layout = node.layout
    writes = [
        FileWrite(layout.agent_server_ca, up.bundles["server-ca"], 0o644),
        FileWrite(layout.agent_client_ca, up.bundles["client-ca"], 0o644),
    ]
    if not dry_run:
        return write_files(layout.data_dir, writes)
    return [fw.path for fw in writes if read_optional(fw.path) != fw.data]


# Commands ------------------------------------------------------------------------------------


def _require_agent_only(cfg: Config) -> None:
    if cfg.is_server:
        raise UsageError(
            "this node has a server role: its agent certificates are signed locally by "
            "`rke2certd renew`; the server endpoint is for agent-only nodes"
        )


def agent_renew(
    node: Node,
    now: datetime,
    *,
    dry_run: bool = False,
    force: frozenset[str] = frozenset(),
    specs: Sequence[LeafSpec] | None = None,
    upstream: Upstream | None = None,
    token: str | None = None,
) -> RenewResult:
    """`renew` on an agent-only node. The caller holds the node lock (not needed for dry runs).

    A dry run still asks the server for its CAs (read-only) to decide; it signs nothing.
    `upstream`: a server already connected to (rotate connects before its backup).
    """
    cfg, layout = node.cfg, node.layout
    _require_agent_only(cfg)
    check_dir_safety([layout.data_dir, layout.agent])
    result = RenewResult(dry_run=dry_run, unit=AGENT_UNIT)
    if not dry_run:
        result.repaired = recover(layout.data_dir, [layout.data_dir, layout.agent])
        for what in result.repaired:
            log.warning("write_repaired", reason=what)
    up = upstream or connect(node, token)
    policy = Policy(timedelta(days=cfg.renew_before_days), force)
    chosen = AGENT_LEAVES if specs is None else tuple(specs)
    observed = [(observe(s, layout, up.bundles[s.signer]), _wanted(s, node, up)) for s in chosen]
    decisions = plan(observed, now, policy)
    result.changes = [
        _apply(d, node, up, now, dry_run) for d in decisions if d.action is not Action.KEEP
    ]
    result.derived = _ca_copies(node, up, dry_run)
    return result


def backup_agent(node: Node, specs: Sequence[LeafSpec], now: datetime) -> Path | None:
    """Copy the selected leaves and the CA copies to agent/tls-<unix-ts>/ (keys 0600)."""
    layout = node.layout
    files = [p for s in specs for p in (s.cert_path(layout), s.key_path(layout))]
    files += [layout.agent_server_ca, layout.agent_client_ca]
    present = [p for p in files if p.is_file() and not p.is_symlink()]
    if not present:
        return None
    ts = int(now.timestamp())
    dest, n = layout.agent / f"tls-{ts}", 1
    while dest.exists():  # two rotations in one second must not mix their backups
        dest, n = layout.agent / f"tls-{ts}.{n}", n + 1
    ensure_dir(dest, 0o700)
    writes = [
        FileWrite(dest / p.name, p.read_bytes(), 0o600 if p.suffix == ".key" else 0o644)
        for p in present
    ]
    write_files(layout.data_dir, writes)
    return dest


def agent_rotate(node: Node, services: Sequence[str], now: datetime) -> RotateResult:
    """New keys and certs (through the server) for the agent services; backup first.

    `services` were validated by `ops.rotate.parse_services`; empty means all agent services.
    The caller holds the node lock.
    """
    _require_agent_only(node.cfg)
    selected = list(services) or list(AGENT_SERVICES)
    foreign = [s for s in selected if s not in AGENT_SERVICES]
    if foreign:
        raise UsageError(
            "; ".join(f"service {s} has no certificate on an agent-only node" for s in foreign)
            + f" (agent services: {', '.join(AGENT_SERVICES)}); nothing was changed"
        )
    specs = by_service(AGENT_LEAVES, selected)
    up = connect(node)  # a server that cannot sign must fail the rotation before any change
    backup_dir = backup_agent(node, specs, now)
    if backup_dir is not None:
        log.info("certs_backed_up", cert_path=str(backup_dir), services=",".join(selected))
    forced = frozenset(s.name for s in specs)
    result = agent_renew(node, now, force=forced, specs=specs, upstream=up)
    return RotateResult(selected, backup_dir, result)
