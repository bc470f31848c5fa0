"""`rke2certd certificate check`: one row per certificate of each file, four renderings.

JSON keeps upstream's field names (Go's encoding/json of k3s' `CertificateInfo`: `Certificates`,
`Filename`, `Subject`, `Issuer`, `Usages`, `ExpiryTime` as RFC 3339, `ResidualTime` as integer
nanoseconds, `Status`). YAML keeps upstream's too, which are what gopkg.in/yaml.v2 makes of the
same struct: lower-cased names and `residualtime` as a Go duration string. Extra fields are added
after them, so scripts written for `rke2 certificate check` keep working.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rke2certd.errors import PKIError, StorageError
from rke2certd.files.atomic import read_optional
from rke2certd.node.cert_facts import FactsCache
from rke2certd.node.node import Node
from rke2certd.pki.profiles import LeafSpec, by_service, leaves_for
from rke2certd.plan.inventory import Row, Status, rows_for
from rke2certd.plan.kubeconfigs import KubeconfigEntry

API_VERSION = "rke2certd.io/v1"


@dataclass
class CheckResult:
    now: datetime
    window_days: int
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # stale copies (node/node_files.py): an admin kubeconfig whose cert is not client-admin.crt
    warnings: list[str] = field(default_factory=list)
    # every kubeconfig of the node: the client cert it names or embeds (plan/kubeconfigs.py)
    kubeconfigs: list[KubeconfigEntry] = field(default_factory=list)


def check(node: Node, services: Sequence[str], now: datetime) -> CheckResult:
    try:
        return _check(node, services, now)
    except PermissionError as exc:
        raise StorageError(
            f"cannot read {exc.filename}: permission denied; run rke2certd as root"
        ) from exc


def _check(node: Node, services: Sequence[str], now: datetime) -> CheckResult:
    cfg = node.cfg
    agent_only = not cfg.is_server or not node.layout.server.exists()
    specs = leaves_for(not agent_only, cfg.has_agent or agent_only)
    if services:
        specs = by_service(specs, services)
    window = timedelta(days=cfg.renew_before_days)
    result = CheckResult(now, cfg.renew_before_days)
    cache = FactsCache.for_data_dir(node.layout.data_dir)
    ca_files: dict[Path, bytes | None] = {}  # each CA file read once
    for spec in specs:
        path = spec.cert_path(node.layout)
        data = read_optional(path)
        if data is None:
            continue  # not issued on this node (upstream skips it too)
        try:
            bundle = cache.facts(data, path)
        except PKIError as exc:
            result.errors.append(str(exc))
            continue
        chain = _chain(cache, node, spec, data, path, ca_files)
        result.rows += rows_for(path, spec.service, bundle, now, window, chain)
    # kubeconfigs, dynamic-cert.json, watch-files
    from rke2certd.node.node_files import read_extra

    listed = frozenset(spec.cert_path(node.layout) for spec in specs)
    extra = read_extra(node, services, now, cache, listed)
    result.rows += extra.rows
    result.errors += extra.errors
    result.warnings += extra.warnings
    result.kubeconfigs += extra.kubeconfigs
    cache.save()
    return result


def _ca_file(node: Node, spec: LeafSpec) -> Path | None:
    """The CA file a leaf is checked against: the server's, else the agent's copy."""
    layout = node.layout
    candidates = [layout.ca_cert(spec.signer)]
    if spec.signer == "server-ca":
        candidates.append(layout.agent_server_ca)
    elif spec.signer == "client-ca":
        candidates.append(layout.agent_client_ca)
    return next((p for p in candidates if p.exists()), None)


def _chain(
    cache: FactsCache,
    node: Node,
    spec: LeafSpec,
    data: bytes,
    path: Path,
    ca_files: dict[Path, bytes | None],
) -> str:
    ca_file = _ca_file(node, spec)
    if ca_file is None:
        return ""
    if ca_file not in ca_files:
        ca_files[ca_file] = read_optional(ca_file)
    ca_data = ca_files[ca_file]
    if not ca_data:
        return ""  # no CA file here (an agent keeps two): nothing to judge against
    try:
        problem = cache.chain(data, ca_data, path)
    except PKIError as exc:
        return f"cannot be checked: {exc}"
    return f"does not verify against {ca_file}: {problem}" if problem else ""


# Rendering --------------------------------------------------------------------------------


def go_time(t: datetime) -> str:
    """Go's RFC 3339 rendering of a UTC time: `2027-11-28T17:43:50Z`."""
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    return text + "Z"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): `8759h59m59.5s`, `1m30s`, `0s`."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size or unit == "ns":
                return sign + _frac(ns, size) + unit
    secs, frac = divmod(ns, 1_000_000_000)
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    s_text = _frac(s * 1_000_000_000 + frac, 1_000_000_000) + "s"
    if h:
        return f"{sign}{h}h{m}m{s_text}"
    if m:
        return f"{sign}{m}m{s_text}"
    return sign + s_text


def _frac(value: int, size: int) -> str:
    whole, rest = divmod(value, size)
    if not rest:
        return str(whole)
    digits = len(str(size)) - 1
    return f"{whole}.{rest:0{digits}d}".rstrip("0")


def humanize(delta: timedelta) -> str:
    """A residual time as people read it: '11 months', '3 days', '-2 hours'."""
    secs = int(delta.total_seconds())
    sign, secs = ("-", -secs) if secs < 0 else ("", secs)
    for unit, size in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ):
        if secs >= size:
            n = secs // size
            return f"{sign}{n} {unit}{'s' if n != 1 else ''}"
    return "now"


def _ns(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def render_json(result: CheckResult) -> str:
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "CertificateCheck",
        "Certificates": [
            {
                "Filename": r.path.name,
                "Subject": r.subject,
                "Issuer": r.issuer,
                "Usages": list(r.usages),
                "ExpiryTime": go_time(r.expiry),
                "ResidualTime": _ns(r.residual),
                "Status": r.status.value,
                "Path": str(r.path),
                "Service": r.service,
                "Index": r.index,
                "Serial": r.serial,
                "NotBefore": go_time(r.not_before),
                "NotAfter": go_time(r.not_after),
                "Chain": r.chain,
            }
            for r in result.rows
        ],
        "Kubeconfigs": [
            {
                "Filename": Path(k.path).name,
                "Subject": k.subject,
                "ExpiryTime": go_time(k.not_after) if k.not_after else None,
                "ResidualTime": _ns(k.residual) if k.residual is not None else None,
                "Status": k.status,
                "Path": k.path,
                "Service": k.service,
                "ClientCertificate": k.cert,
                "CertificateAuthority": k.ca,
                "Problem": k.problem,
            }
            for k in result.kubeconfigs
        ],
    }
    if result.errors:
        doc["Errors"] = result.errors
    if result.warnings:
        doc["Warnings"] = result.warnings
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def render_yaml(result: CheckResult) -> str:
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "CertificateCheck",
        "certificates": [
            {
                "filename": r.path.name,
                "subject": r.subject,
                "issuer": r.issuer,
                "usages": list(r.usages),
                "expirytime": go_time(r.expiry),
                "residualtime": go_duration(_ns(r.residual)),
                "status": r.status.value,
                "path": str(r.path),
                "service": r.service,
                "index": r.index,
                "serial": r.serial,
                "chain": r.chain,
            }
            for r in result.rows
        ],
        "kubeconfigs": [
            {
                "filename": Path(k.path).name,
                "subject": k.subject,
                "expirytime": go_time(k.not_after) if k.not_after else None,
                "residualtime": go_duration(_ns(k.residual)) if k.residual is not None else None,
                "status": k.status,
                "path": k.path,
                "service": k.service,
                "clientcertificate": k.cert,
                "certificateauthority": k.ca,
                "problem": k.problem,
            }
            for k in result.kubeconfigs
        ],
    }
    if result.errors:
        doc["errors"] = result.errors
    if result.warnings:
        doc["warnings"] = result.warnings
    import yaml  # only this format needs it (~13 ms to import)

    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def render_text(result: CheckResult) -> str:
    lines = []
    for r in result.rows:
        usages = ",".join(r.usages)
        when = go_time(r.expiry)
        match r.status:
            case Status.NOT_YET_VALID:
                tail = f"is not valid before {when}"
            case Status.EXPIRED:
                tail = f"expired at {when}"
            case Status.WARNING:
                tail = f"will expire within {result.window_days} days at {when}"
            case Status.CHAIN_BROKEN:
                tail = f"(expires at {when}) {r.chain}"
            case _:
                tail = f"is ok, expires at {when}"
        if r.chain and r.status is not Status.CHAIN_BROKEN:
            tail += f"; its chain {r.chain}"
        lines.append(f"{r.status.value}: {r.path}: certificate {r.subject} ({usages}) {tail}")
    lines += [_kubeconfig_line(k) for k in result.kubeconfigs]
    lines += [f"ERROR: {e}" for e in result.errors]
    lines += [f"WARNING: {w}" for w in result.warnings]
    return "\n".join(lines) + ("\n" if lines else "")


def render_table(result: CheckResult) -> str:
    header = ("FILENAME", "SUBJECT", "ISSUER", "USAGES", "EXPIRES", "RESIDUAL TIME", "STATUS")
    rows = [header, tuple("-" * len(h) for h in header)]
    for r in result.rows:
        rows.append(
            (
                _display_name(r.path),
                r.subject,
                r.issuer,
                ",".join(r.usages),
                r.expiry.strftime("%b %d, %Y %H:%M UTC"),
                humanize(r.residual),
                r.status.value,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if result.kubeconfigs:
        out += ["", "KUBECONFIGS", *_kubeconfig_table(result.kubeconfigs)]
    out += [f"CHAIN BROKEN: {r.path}: {r.chain}" for r in result.rows if r.chain]
    out += [
        f"KUBECONFIG {k.status}: {k.path}: {k.problem}" for k in result.kubeconfigs if k.problem
    ]
    out += [f"ERROR: {e}" for e in result.errors]
    out += [f"WARNING: {w}" for w in result.warnings]
    return "\n".join(out) + "\n"


def _kubeconfig_line(k: KubeconfigEntry) -> str:
    cert = "no client certificate"
    if k.cert:
        cert = f"client certificate {k.cert}"
        if k.subject:
            cert += f" ({k.subject})"
        if k.not_after:
            cert += f" expires at {go_time(k.not_after)}"
    ca = f"; certificate authority {k.ca}" if k.ca else ""
    problem = f"; {k.problem}" if k.problem else ""
    return f"{k.status}: {k.path}: kubeconfig, {cert}{ca}{problem}"


def _kubeconfig_table(entries: Sequence[KubeconfigEntry]) -> list[str]:
    header = ("KUBECONFIG", "SERVICE", "CLIENT CERTIFICATE", "SUBJECT", "EXPIRES", "CA", "STATUS")
    rows = [header, tuple("-" * len(h) for h in header)]
    for k in entries:
        rows.append(
            (
                _display_name(Path(k.path)),
                k.service,
                _display_name(Path(k.cert)) if k.cert.startswith("/") else (k.cert or "-"),
                k.subject or "-",
                k.not_after.strftime("%b %d, %Y %H:%M UTC") if k.not_after else "-",
                _display_name(Path(k.ca)) if k.ca.startswith("/") else (k.ca or "-"),
                k.status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _display_name(path: Path) -> str:
    # agent/ and server/tls/ both hold client-kube-proxy.crt: show the parent when ambiguous.
    return f"{path.parent.name}/{path.name}"


RENDERERS = {"text": render_text, "table": render_table, "json": render_json, "yaml": render_yaml}
