"""The node's other cert-bearing files: kubeconfigs, RKE2's dynamiclistener cache, and the
files an operator names (`watch-files`).

- Kubeconfigs RKE2 writes: `server/cred/*.kubeconfig`, `agent/*.kubeconfig` (they name the
  cert files) and the admin kubeconfig (`write-kubeconfig`, default `/etc/rancher/rke2/rke2.yaml`)
  with the admin client cert, its key and the server CA embedded (`*-data`, base64). A stale
  admin kubeconfig (its cert is not `client-admin.crt` any more, or its CA is not
  `server-ca.crt`) is rewritten from those files, every other byte kept: RKE2 writes it at its
  start, and kubectl should not wait for the next one after a renewal or a CA rotation.
- `server/tls/dynamic-cert.json`: the supervisor/apiserver serving cert dynamiclistener keeps,
  a Kubernetes Secret as JSON (`data["tls.crt"]`, base64 PEM). When it expired, is inside the
  renewal window or was not signed by the current server CA, the startup hook creates
  `server/tls/dynamic-cert-regenerate`: RKE2 then makes a new one at its start (and deletes the
  marker); rke2certd never writes the cache itself.
- `watch-files`: globs of PEM files and kubeconfigs, reported and exported, never written.

Kubeconfigs are read with a line match on the `*-data` / file keys, not a YAML parser: the same
match rewrites a value in place, and `certificate check` stays free of the yaml import.
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from rke2certd.errors import PKIError
from rke2certd.files.atomic import read_optional
from rke2certd.log import log
from rke2certd.node.cert_facts import FactsCache
from rke2certd.node.node import Node
from rke2certd.plan.inventory import CertFacts, Row, Status, rows_for, status
from rke2certd.plan.kubeconfigs import EMBEDDED, KubeconfigEntry, KubeconfigRead, judge

# kubeconfig name -> service (`certificate check -s`)
CRED_SERVICES = {
    "admin": "admin",
    "supervisor": "supervisor",
    "controller": "controller-manager",
    "scheduler": "scheduler",
    "api-server": "api-server",
    "cloud-controller": "cloud-controller",
}
AGENT_SERVICES = {
    "kubelet": "kubelet",
    "kubeproxy": "kube-proxy",
    "rke2controller": "rke2-controller",
}
WATCHED = "watched"  # the service of `watch-files` (not a service one can select or renew)

_KEY = (
    rb"client-certificate-data|client-key-data|certificate-authority-data|"
    rb"client-certificate|client-key|certificate-authority"
)
_LINE = re.compile(
    rb"^(?P<head>[ \t]*-?[ \t]*(?P<key>" + _KEY + rb")[ \t]*:[ \t]*)"
    rb"(?P<q>[\"']?)(?P<value>[^\s\"'#]+)(?P=q)[ \t]*\r?$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Source:
    path: Path
    service: str
    kind: str  # kubeconfig | dynamic-cert | pem


@dataclass
class Extra:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kubeconfigs: list[KubeconfigEntry] = field(default_factory=list)


def sources(node: Node) -> list[Source]:
    layout, cfg = node.layout, node.cfg
    out: list[Source] = []
    if cfg.is_server:
        out += [
            Source(p, CRED_SERVICES.get(p.stem, "admin"), "kubeconfig")
            for p in sorted(layout.cred.glob("*.kubeconfig"))
        ]
    out += [
        Source(p, AGENT_SERVICES.get(p.stem, "kubelet"), "kubeconfig")
        for p in sorted(layout.agent.glob("*.kubeconfig"))
    ]
    if cfg.is_server:
        out.append(Source(cfg.kubeconfig_file, "admin", "kubeconfig"))
        out.append(Source(dynamic_cert(node), "rke2-server", "dynamic-cert"))
    seen = {s.path for s in out}
    for pattern in cfg.watch_files:
        for name in sorted(glob.glob(pattern)):
            path = Path(name)
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            out.append(Source(path, WATCHED, "watched"))
    return out


def dynamic_cert(node: Node) -> Path:
    return node.layout.tls / "dynamic-cert.json"


# Reading ----------------------------------------------------------------------------------


def kubeconfig_certs(
    text: bytes, where: Path, listed: frozenset[Path] = frozenset()
) -> list[tuple[str, bytes]]:
    """(YAML key, PEM bytes) of each user client cert: embedded, or the file it names. A named
    file already in the inventory (`listed`: RKE2's own kubeconfigs name its leaves) is only
    checked to exist: its rows are that file's."""
    out: list[tuple[str, bytes]] = []
    for m in _LINE.finditer(text):
        key, value = m["key"].decode(), m["value"]
        if key == "client-certificate-data":
            try:
                out.append((key, base64.b64decode(value, validate=True)))
            except (binascii.Error, ValueError):
                raise PKIError(f"{where}: {key} is not base64") from None
        elif key == "client-certificate":
            ref = Path(value.decode(errors="replace"))
            ref = ref if ref.is_absolute() else where.parent / ref
            if ref in listed:
                if not ref.exists():
                    raise PKIError(f"{where}: {key} names {ref}, which does not exist")
                continue
            data = read_optional(ref)
            if data is None:
                raise PKIError(f"{where}: {key} names {ref}, which does not exist")
            out.append((key, data))
    return out


def dynamic_cert_pem(data: bytes, where: Path) -> bytes:
    """The serving cert of dynamiclistener's file cache (a Secret as JSON)."""
    try:
        doc = json.loads(data)
        return base64.b64decode(doc["data"]["tls.crt"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise PKIError(f"{where}: not a dynamiclistener cache (no data.tls.crt)") from None


def _is_kubeconfig(data: bytes) -> bool:
    return b"-----BEGIN" not in data and bool(_LINE.search(data))


def read_extra(
    node: Node,
    services: Sequence[str],
    now: datetime,
    cache: FactsCache,
    listed: frozenset[Path] = frozenset(),
) -> Extra:
    """The rows of the other files, their read errors, stale copies (`warnings`) and the
    kubeconfig inventory; `listed`: the cert files already in the inventory."""
    window = timedelta(days=node.cfg.renew_before_days)
    out = Extra()
    refs = _Refs(node, cache)
    for src in sources(node):
        if services and src.service not in services:
            continue
        data = read_optional(src.path)
        if data is None:
            continue
        is_kubeconfig = src.kind == "kubeconfig" or (src.kind == "watched" and _is_kubeconfig(data))
        if is_kubeconfig:
            out.kubeconfigs += [judge(r, now, window) for r in kubeconfig_reads(src, data, refs)]
        try:
            if src.kind == "dynamic-cert":
                pems = [("", dynamic_cert_pem(data, src.path))]
            elif is_kubeconfig:
                pems = kubeconfig_certs(data, src.path, listed)
            else:
                pems = [("", data)]
            for key, pem in pems:
                rows = rows_for(src.path, src.service, cache.facts(pem, src.path), now, window)
                if key:
                    rows = [_embedded(r, key) for r in rows]
                out.rows += rows
        except PKIError as exc:
            out.errors.append(str(exc))
            continue
        if src.path == node.cfg.kubeconfig_file:
            stale = admin_kubeconfig_stale(node, data)
            if stale:
                out.warnings.append(f"{src.path}: {stale}")
    return out


# The kubeconfig inventory ---------------------------------------------------------------------

# kubeconfig -> the leaf it should name: server/cred/<name>.kubeconfig and agent/<name>.kubeconfig
_AGENT_LEAVES = {
    "kubelet": "client-kubelet",
    "kubeproxy": "client-kube-proxy",
    "rke2controller": "client-rke2-controller",
}


class _Refs:
    """The node's current leaves and CAs a kubeconfig is judged against, each read once."""

    def __init__(self, node: Node, cache: FactsCache) -> None:
        self.node, self.cache = node, cache
        self._facts: dict[Path, list[CertFacts]] = {}

    def facts(self, path: Path | None) -> list[CertFacts]:
        """Every certificate of a file, in order (none: missing or unreadable)."""
        if path is None:
            return []
        if path not in self._facts:
            data = read_optional(path)
            try:
                self._facts[path] = self.cache.facts(data, path) if data else []
            except PKIError:
                self._facts[path] = []
        return self._facts[path]

    def first_existing(self, *paths: Path) -> Path | None:
        return next((p for p in paths if p.exists()), None)

    def leaf(self, src: Source) -> Path | None:
        """The leaf RKE2 names in this kubeconfig (None: not one of RKE2's)."""
        from rke2certd.pki.profiles import KUBECONFIGS

        layout = self.node.layout
        if src.kind != "kubeconfig":
            return None
        if src.path == self.node.cfg.kubeconfig_file:
            return layout.tls / "client-admin.crt"
        if src.path.parent == layout.cred and src.path.stem in KUBECONFIGS:
            return layout.tls / f"{KUBECONFIGS[src.path.stem]}.crt"
        if src.path.parent == layout.agent and src.path.stem in _AGENT_LEAVES:
            return layout.agent / f"{_AGENT_LEAVES[src.path.stem]}.crt"
        return None

    def ca(self, name: str) -> Path | None:
        layout = self.node.layout
        agent = layout.agent_server_ca if name == "server-ca" else layout.agent_client_ca
        return self.first_existing(layout.ca_cert(name), agent)


def cache_first(cache: FactsCache, data: bytes, path: Path) -> CertFacts | None:
    bundle = cache.facts(data, path)
    return bundle[0] if bundle else None


def _ref_path(value: bytes, where: Path) -> Path:
    ref = Path(value.decode(errors="replace"))
    return ref if ref.is_absolute() else where.parent / ref


def kubeconfig_reads(src: Source, text: bytes, refs: _Refs) -> list[KubeconfigRead]:
    """One read per client cert of a kubeconfig (one for a kubeconfig without any), with what
    RKE2's own kubeconfigs are judged against: the current leaf, its CA, the server CA."""
    ca, ca_facts, ca_problem = "", None, ""
    certs: list[tuple[str, bytes | None, Path]] = []  # (what it names, PEM, where)
    for m in _LINE.finditer(text):
        key, value = m["key"].decode(), m["value"]
        if key in ("certificate-authority-data", "certificate-authority") and not ca:
            data: bytes | None = None
            try:
                if key.endswith("-data"):
                    ca = EMBEDDED
                    data = base64.b64decode(value, validate=True)
                else:
                    ca = str(_ref_path(value, src.path))
                    data = read_optional(Path(ca))
                if data is None:
                    ca_problem = f"its certificate authority {ca} does not exist"
                else:
                    ca_facts = cache_first(refs.cache, data, src.path)
            except (binascii.Error, ValueError, PKIError):
                ca_problem = f"its certificate authority ({ca or key}) is not a certificate"
        elif key == "client-certificate-data":
            try:
                certs.append((EMBEDDED, base64.b64decode(value, validate=True), src.path))
            except (binascii.Error, ValueError):
                certs.append((EMBEDDED, None, src.path))
        elif key == "client-certificate":
            path = _ref_path(value, src.path)
            certs.append((str(path), read_optional(path), path))
    leaf = refs.leaf(src)
    leaf_facts = refs.facts(leaf)[:1]
    # CA files hold a bundle while a rotation rolls out: any of its CAs is a current one
    signers = tuple(c.subject for c in refs.facts(refs.ca("client-ca"))) if leaf else ()
    server_ca = {c.serial for c in refs.facts(refs.ca("server-ca"))} if leaf else set()
    ca_current = None
    if ca_facts is not None and server_ca:
        ca_current = ca_facts.serial in server_ca
    out: list[KubeconfigRead] = []
    for named, pem, where in certs or [("", None, src.path)]:
        facts, unreadable, chain = None, "", signers
        if named and pem is None:
            unreadable = (
                f"its client certificate {named} does not exist"
                if named != EMBEDDED
                else "its client-certificate-data is not base64"
            )
        elif pem is not None:
            try:
                bundle = refs.cache.facts(pem, where)
                facts = bundle[0] if bundle else None
                # an intermediate sent along with the cert, issued by a current CA, is current
                chain += tuple(c.subject for c in bundle[1:] if c.issuer in signers)
            except PKIError as exc:
                unreadable = str(exc)
        out.append(
            KubeconfigRead(
                str(src.path),
                src.service,
                named,
                ca,
                facts,
                unreadable,
                leaf_file=str(leaf or ""),
                leaf_serial=leaf_facts[0].serial if leaf_facts else None,
                signers=chain,
                ca_current=ca_current,
                ca_problem=ca_problem if leaf else "",
            )
        )
    return out


def _embedded(row: Row, key: str) -> Row:
    from dataclasses import replace

    return replace(row, embedded_kind="user", embedded_key=key)


# The admin kubeconfig -----------------------------------------------------------------------


def _wanted_admin(node: Node) -> dict[bytes, bytes] | None:
    """The `*-data` values RKE2 would write from the files now on disk (None: not all there)."""
    tls = node.layout.tls
    files = {
        b"client-certificate-data": read_optional(tls / "client-admin.crt"),
        b"client-key-data": read_optional(tls / "client-admin.key"),
        b"certificate-authority-data": read_optional(tls / "server-ca.crt"),
    }
    if any(v is None for v in files.values()):
        return None
    return {k: base64.b64encode(v) for k, v in files.items() if v is not None}


_STALE = {
    b"client-certificate-data": "its client certificate is not client-admin.crt",
    b"client-key-data": "its client key is not client-admin.key",
    b"certificate-authority-data": "its certificate-authority-data is not server-ca.crt (old CA)",
}


def admin_kubeconfig_stale(node: Node, text: bytes) -> str | None:
    """Why the admin kubeconfig's embedded cert, key or CA is not the one on disk (None: they
    are); every difference, in a fixed order."""
    wanted = _wanted_admin(node)
    if wanted is None:
        return None
    found: set[bytes] = set()
    for m in _LINE.finditer(text):
        key = m["key"]
        if key in wanted and m["value"] != wanted[key]:
            try:
                same = base64.b64decode(m["value"]) == base64.b64decode(wanted[key])
            except (binascii.Error, ValueError):
                same = False
            if not same:
                found.add(key)
    reasons = [why for key, why in _STALE.items() if key in found]
    return "; ".join(reasons) or None


def refresh_admin_kubeconfig(node: Node) -> bool:
    """Rewrite the stale `*-data` values of the admin kubeconfig in place (the caller holds the
    node lock). Refused, with a warning, when it holds more than one user or cluster: which
    one RKE2 wrote is then a guess."""
    path = node.cfg.kubeconfig_file
    text = read_optional(path)
    wanted = _wanted_admin(node)
    if text is None or wanted is None or not node.cfg.is_server:
        return False
    stale = admin_kubeconfig_stale(node, text)
    if stale is None:
        return False
    keys = [m["key"] for m in _LINE.finditer(text) if m["key"] in wanted]
    if any(keys.count(k) > 1 for k in wanted):
        why = f"{stale}; not rewritten: it holds more than one user or cluster"
        log.warning("kubeconfig_stale", cert_path=str(path), reason=why)
        return False

    def put(m: re.Match[bytes]) -> bytes:
        if m["key"] not in wanted:
            return m[0]
        return (
            m["head"]
            + m["q"]
            + wanted[m["key"]]
            + m["q"]
            + (b"\r" if m[0].endswith(b"\r") else b"")
        )

    new = _LINE.sub(put, text)
    from rke2certd.files.atomic import write_file

    write_file(path, new, path.stat().st_mode & 0o777)
    log.info("kubeconfig_rewritten", cert_path=str(path), reason=stale)
    return True


# dynamic-cert.json ----------------------------------------------------------------------------


def dynamic_cert_problem(node: Node, now: datetime) -> str | None:
    """Why RKE2 should regenerate its dynamiclistener cert at its next start (None: keep it).
    Facts come from the facts cache (no X.509 parsing on an unchanged node: this runs before
    every RKE2 start); the issuer is compared by name with the server CA's subject, which
    carries the CA's creation time in RKE2's CNs."""
    path = dynamic_cert(node)
    data = read_optional(path)
    ca_data = read_optional(node.layout.ca_cert("server-ca"))
    if data is None or ca_data is None:
        return None
    cache = FactsCache.for_data_dir(node.layout.data_dir)
    try:
        leaf = cache.facts(dynamic_cert_pem(data, path), path)[0]
        ca = cache.facts(ca_data, node.layout.ca_cert("server-ca"))[0]
    except (PKIError, IndexError) as exc:
        return f"unreadable: {exc}"
    finally:
        cache.save()
    window = timedelta(days=node.cfg.renew_before_days)
    match status(leaf, now, window):
        case Status.EXPIRED:
            return f"expired at {leaf.not_after.isoformat()}"
        case Status.NOT_YET_VALID:
            return "not yet valid"
        case Status.WARNING:
            return f"expires within {node.cfg.renew_before_days} days"
    if leaf.issuer != ca.subject:
        return f"issued by {leaf.issuer}, not the current server CA {ca.subject}"
    return None


def request_dynamic_regenerate(node: Node, now: datetime) -> str | None:
    """The startup hook's part: the regenerate marker when the cache needs it (caller holds
    the node lock). Returns why, or None."""
    why = dynamic_cert_problem(node, now)
    marker = node.layout.dynamic_cert_regenerate
    if why is None or marker.exists():
        return why
    from rke2certd.files.atomic import write_file

    write_file(marker, b"", 0o600)
    log.info("dynamic_cert_regenerate", cert_path=str(dynamic_cert(node)), reason=why)
    return why


def status_of(rows: Sequence[Row]) -> Status:
    """The worst status of some rows (OK when none)."""
    order = [Status.OK, Status.WARNING, Status.NOT_YET_VALID, Status.EXPIRED]
    return max((r.status for r in rows), key=order.index, default=Status.OK)
