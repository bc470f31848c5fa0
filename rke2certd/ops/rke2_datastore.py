"""Which datastore this node uses: RKE2's own on a node with an RKE2 config, SQLite standalone.

rke2certd keeps the CA set in the same bootstrap key RKE2 reconciles at every start, so on an
RKE2 node it must use the datastore RKE2 uses, never one of its own:

- RKE2's `datastore-endpoint` (an external etcd, http or https): as RKE2 reaches it, with the
  `datastore-*file` settings only (http needs none);
- otherwise RKE2's embedded etcd: on an etcd node the local member (`health-etcd-endpoint`,
  https://127.0.0.1:2379 as RKE2 listens),
  on a control-plane-only node (`disable-etcd`) the members' client URLs, asked from the
  supervisor of `server:` at `/db/info` (basic auth `server:<password>`, over TLS pinned by
  the token's CA hash), as RKE2 itself learns them; both with the etcd client files RKE2
  writes in `server/tls/etcd/`.

An SQL datastore (RKE2 reaches it through kine) is refused: rke2certd talks etcd only.
A node with no RKE2 config (the demo, the tests) keeps the embedded SQLite file.
`plan_datastore` decides from the configuration alone; `open_for` opens what it names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from rke2certd.config import Config, Role
from rke2certd.constants import RKE2_SUPERVISOR_PORT
from rke2certd.datastore import open_datastore
from rke2certd.datastore.base import DatastoreUnavailable
from rke2certd.errors import ConfigError, TokenError
from rke2certd.pki.layout import Layout

if TYPE_CHECKING:
    from rke2certd.datastore.base import Datastore

DB_INFO_PATH = "/db/info"
LOCAL_ETCD = "https://127.0.0.1:2379"  # where RKE2's etcd listens (health-etcd-endpoint's default)


class UnsupportedDatastoreError(ConfigError):
    """RKE2 uses a datastore rke2certd cannot share (SQL through kine)."""


class EmbeddedEtcdDown(DatastoreUnavailable):
    """This node's member of RKE2's embedded etcd is not running: RKE2 is down (the normal
    state when rke2-server's ExecStartPre= runs), nothing to report."""


@dataclass(frozen=True)
class DatastorePlan:
    kind: str  # sqlite | etcd | etcd-members (the endpoints come from /db/info)
    endpoint: str  # open_datastore's endpoint; "" for etcd-members until looked up
    description: str  # for `status` and messages (no credentials)
    shared_with_rke2: bool
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    embedded: bool = False  # RKE2's embedded etcd (down while RKE2 is)


def default_sqlite(layout: Layout) -> str:
    return f"sqlite://{layout.server / 'db' / 'rke2certd.sqlite'}"


def _shown(endpoint: str) -> str:
    """An endpoint for messages: the scheme only when it may carry a password (a DSN)."""
    scheme = endpoint.partition("://")[0]
    return f"{scheme}://..." if "://" in endpoint else "..."


def plan_datastore(cfg: Config, layout: Layout) -> DatastorePlan:
    """The datastore of this node (pure: decided from the configuration)."""
    endpoint = cfg.datastore_endpoint.strip()
    scheme = endpoint.partition("://")[0].lower() if "://" in endpoint else ""
    etcd_tls = layout.tls / "etcd"
    node_files = (
        cfg.datastore_cafile or etcd_tls / "server-ca.crt",
        cfg.datastore_certfile or etcd_tls / "client.crt",
        cfg.datastore_keyfile or etcd_tls / "client.key",
    )
    if cfg.rke2_config is None:  # standalone: rke2certd's own store, as before
        if not endpoint or scheme == "sqlite":
            where = endpoint or default_sqlite(layout)
            return DatastorePlan("sqlite", where, f"standalone SQLite ({where})", False)
        if scheme == "http":
            return DatastorePlan("etcd", endpoint, f"etcd at {endpoint} (configured)", False)
        return DatastorePlan(
            "etcd", endpoint, f"etcd at {endpoint} (configured)", False, *node_files
        )
    if endpoint:
        if scheme not in ("http", "https"):
            raise UnsupportedDatastoreError(
                "RKE2's datastore is not one rke2certd can share",
                [
                    f"datastore-endpoint '{_shown(endpoint)}' (from {_where(cfg)}) is a SQL "
                    "datastore that RKE2 reaches through kine; rke2certd keeps the CA set in "
                    "RKE2's bootstrap key and reads it through etcd only: RKE2's embedded etcd "
                    "(no datastore-endpoint) or an external etcd (http(s)://host:2379,...)",
                    "on this cluster, leave certificates to RKE2 (uninstall rke2certd) or move "
                    "RKE2 to etcd; rke2certd must never keep a second copy of the CAs",
                ],
            )
        files = (
            (None, None, None)
            if scheme == "http"
            else (cfg.datastore_cafile, cfg.datastore_certfile, cfg.datastore_keyfile)
        )
        return DatastorePlan("etcd", endpoint, f"RKE2's external etcd at {endpoint}", True, *files)
    if Role.ETCD in cfg.roles:
        local = cfg.health_etcd_endpoint  # this node's member (https://127.0.0.1:2379)
        return DatastorePlan(
            "etcd",
            local,
            f"RKE2's embedded etcd, this node's member ({local})",
            True,
            *node_files,
            embedded=True,
        )
    if not cfg.server:
        raise ConfigError(
            "this control-plane-only node (no etcd role) has no `server` to join",
            [
                f"RKE2's config {cfg.rke2_config} must set "
                f"`server: https://<server>:{RKE2_SUPERVISOR_PORT}` on a node with disable-etcd: "
                "its datastore is the etcd members of that cluster"
            ],
        )
    return DatastorePlan(
        "etcd-members",
        "",
        f"RKE2's embedded etcd, the members listed by {cfg.server}{DB_INFO_PATH}",
        True,
        *node_files,
        embedded=True,
    )


def _where(cfg: Config) -> str:
    return ", ".join(str(p) for p in cfg.sources) or "the configuration"


def member_client_urls(doc: object, self_ips: tuple[str, ...]) -> list[str]:
    """The client URLs of a `/db/info` answer (etcd's member list as JSON: {"members":
    [{"name", "clientURLs", "isLearner"}, ...]}), learners and this node left out as RKE2
    does. Raises ValueError when the answer is not such a list."""
    if not isinstance(doc, dict) or not isinstance(doc.get("members"), list):
        raise ValueError("not an etcd member list")
    urls: list[str] = []
    for member in doc["members"]:
        if not isinstance(member, dict):
            raise ValueError("a member is not an object")
        if member.get("isLearner"):
            continue
        client = member.get("clientURLs") or []
        if not isinstance(client, list) or not all(isinstance(u, str) for u in client):
            raise ValueError("clientURLs is not a list of URLs")
        if any(urlsplit(u).hostname in self_ips for u in client):
            continue
        urls += [u for u in client if urlsplit(u).scheme in ("http", "https")]
    return urls


def lookup_members(cfg: Config, token: str, self_ips: tuple[str, ...], timeout: float) -> str:
    """The etcd endpoints of the cluster `server:` belongs to, from its supervisor."""
    from rke2certd.supervisor.client import UnreachableError, get_as_server

    assert cfg.server is not None
    try:
        body = get_as_server(cfg.server, token, DB_INFO_PATH, timeout=timeout)
    except UnreachableError as exc:
        raise DatastoreUnavailable(f"cannot learn the etcd members: {exc}") from exc
    try:
        urls = member_client_urls(json.loads(body), self_ips)
    except ValueError as exc:
        raise DatastoreUnavailable(
            f"the {DB_INFO_PATH} answer of {cfg.server} is not an etcd member list ({exc})"
        ) from exc
    if not urls:
        raise DatastoreUnavailable(f"{cfg.server}{DB_INFO_PATH} lists no etcd member to use")
    return ",".join(urls)


def local_member_urls(endpoint: str, self_ips: tuple[str, ...]) -> list[str]:
    """Where this node's etcd member answers: RKE2's listens on 127.0.0.1 and on the node's
    IPs, so with the default endpoint each of those is a candidate too (first: loopback)."""
    if endpoint.rstrip("/") != LOCAL_ETCD:
        return [endpoint]
    out = [endpoint]
    for ip in self_ips:
        url = f"https://[{ip}]:2379" if ":" in ip else f"https://{ip}:2379"
        if url not in out:
            out.append(url)
    return out


def _listening(url: str, timeout: float) -> bool:
    """A quick TCP connect: while RKE2 is down its embedded etcd is too, and saying so costs
    no etcd client (requests, ~85 ms to import) on the startup hook's path."""
    import socket  # only here: ~4 ms to import, and only an RKE2 etcd node needs it

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 2379), timeout):
            return True
    except OSError:
        return False


def open_planned(
    plan: DatastorePlan, cfg: Config, token: str | None, self_ips: tuple[str, ...],
    timeout: float = 5.0,
) -> Datastore:  # fmt: skip
    """Open the planned store. RKE2's embedded etcd that is not up (RKE2 is down, or has not
    written its etcd client files yet) is DatastoreUnavailable, never a configuration error."""
    endpoint = plan.endpoint
    if plan.embedded:
        missing = [str(p) for p in (plan.cafile, plan.certfile, plan.keyfile)
                   if p is not None and not p.is_file()]  # fmt: skip
        if missing:
            raise DatastoreUnavailable(
                "RKE2's etcd client files are not there (RKE2 writes them at its start): "
                + ", ".join(missing)
            )
    if plan.kind == "etcd-members":
        if token is None:
            raise TokenError(
                "a control-plane-only node needs the cluster's server token (`token` in "
                "RKE2's config) to ask its server for the etcd members"
            )
        endpoint = lookup_members(cfg, token, self_ips, timeout)
    elif plan.embedded:
        candidates = local_member_urls(endpoint, self_ips)
        up = [url for url in candidates if _listening(url, min(timeout, 1.0))]
        if not up:
            where = ", ".join(candidates)
            raise EmbeddedEtcdDown(f"RKE2's embedded etcd at {where} is not running")
        endpoint = ",".join(up)
    return open_datastore(
        endpoint,
        data_dir=cfg.data_dir,
        cafile=plan.cafile,
        certfile=plan.certfile,
        keyfile=plan.keyfile,
        timeout=timeout,
    )
