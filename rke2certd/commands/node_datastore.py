"""Opening the node's datastore as `node/rke2_datastore.py` plans it: RKE2's embedded etcd only
when it listens, the members of a control-plane-only node asked of its server's supervisor
(`/db/info`), SQLite standalone."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from rke2certd.config import Config
from rke2certd.datastore import open_datastore
from rke2certd.datastore.base import Datastore, DatastoreUnavailable
from rke2certd.errors import TokenError
from rke2certd.node.bootstrap_data import configured_token
from rke2certd.node.node import Node
from rke2certd.node.rke2_datastore import (
    DB_INFO_PATH,
    DatastorePlan,
    EmbeddedEtcdDown,
    local_member_urls,
    member_client_urls,
    plan_datastore,
)


def open_for(node: Node, timeout: float = 5.0) -> Datastore:
    """The node's datastore: RKE2's on a node with an RKE2 config, else rke2certd's own
    (node/rke2_datastore.py says which and why)."""
    plan = plan_datastore(node.cfg, node.layout)
    token = configured_token(node.cfg, node.layout) if plan.kind == "etcd-members" else None
    return open_planned(plan, node.cfg, token, node.ident.node_ips, timeout)


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
    plan: DatastorePlan,
    cfg: Config,
    token: str | None,
    self_ips: tuple[str, ...],
    timeout: float = 5.0,
) -> Datastore:
    """Open the planned store. RKE2's embedded etcd that is not up (RKE2 is down, or has not
    written its etcd client files yet) is DatastoreUnavailable, never a configuration error."""
    endpoint = plan.endpoint
    if plan.embedded:
        missing = [
            str(p)
            for p in (plan.cafile, plan.certfile, plan.keyfile)
            if p is not None and not p.is_file()
        ]
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
