"""What servers and agent-only nodes do alike around a renew."""

from __future__ import annotations

from contextlib import suppress

from rke2certd.clock import system_clock
from rke2certd.errors import Rke2certdError
from rke2certd.node.node import Node


def before_rke2() -> Rke2certdError:
    from rke2certd.errors import UsageError

    return UsageError(
        "RKE2 has not started on this node yet: it creates (first server) or fetches (joining "
        "server) the CA set and every certificate at its first start, and runs the datastore; "
        "run this once rke2-server has started"
    )


def node_files(node: Node) -> None:
    """The startup hook's part for the files RKE2 writes itself: the admin kubeconfig brought
    up to date, and dynamiclistener's cert regenerated at RKE2's start when it must be."""
    from rke2certd.node.node_files import refresh_admin_kubeconfig, request_dynamic_regenerate

    refresh_admin_kubeconfig(node)
    request_dynamic_regenerate(node, system_clock())


def warm_check_cache(node: Node) -> None:
    """Record the facts of the certs renew just wrote or kept (node/cert_facts.py), so that the
    next `certificate check` reads no X.509. Costs ~1 ms when nothing changed; a cache only."""
    from rke2certd.commands.check import check

    # An error (a file renew left alone is unreadable) is `check`'s to report, not renew's.
    with suppress(Rke2certdError, OSError):
        check(node, [], system_clock())


def certs_usable(node: Node) -> bool:
    """Every certificate of the node is there and none is expired or not yet valid."""
    from rke2certd.commands.check import check
    from rke2certd.plan.inventory import failing

    try:
        result = check(node, [], system_clock())
    except Rke2certdError:
        return False
    return bool(result.rows) and not failing(result.rows) and not result.errors
