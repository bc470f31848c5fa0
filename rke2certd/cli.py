"""The command line. Output for people and scripts goes to stdout; logs go to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rke2certd import __version__
from rke2certd.clock import system_clock
from rke2certd.config import Config, load_config
from rke2certd.constants import LOG_FORMATS, LOG_LEVELS
from rke2certd.errors import Rke2certdError
from rke2certd.log import setup as log_setup
from rke2certd.ops.node import Node

if TYPE_CHECKING:
    from rke2certd.datastore.base import Datastore
    from rke2certd.ops.rotate_ca import RotateCAResult
    from rke2certd.plan.rollout import Rollout

Handler = Callable[[argparse.Namespace, Config], int]


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (as `rke2 certificate … -d DIR`)."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--config", "-c", type=Path, default=s, help="config file "
                   "(default /etc/rke2certd/config.yaml; missing = defaults)")  # fmt: skip
    p.add_argument("--data-dir", "-d", type=Path, default=s, help="RKE2 data dir")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=s)
    p.add_argument("--log-level", choices=LOG_LEVELS, default=s)
    p.add_argument("--debug", action="store_true", default=s, help="same as --log-level debug")
    return p


def _services_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", "-s", action="append", default=[], metavar="SVC[,SVC]",
                   help="limit to these services (repeatable, comma lists)")  # fmt: skip


def _exit_codes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exit-codes", choices=["default", "nagios"], default="default",
                   help="nagios: exit 0 OK, 1 warning, 2 critical, 3 unknown (monitoring "
                   "plugins); default: today's codes")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="rke2certd",
        description="Keeps an RKE2 node's certificates valid and rotates its CAs safely.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"rke2certd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("renew", parents=[common], help="the startup hook: create/renew certs")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--output", "-o", choices=["text", "json"], default="text")
    p.add_argument("--offline-ok", action="store_true",
                   help="datastore unreachable but the CA set complete on disk: renew from "
                   "it (ExecStartPre= with embedded etcd)")  # fmt: skip
    p.set_defaults(handler=cmd_renew)

    cert = sub.add_parser("certificate", parents=[common], help="check / rotate certificates")
    csub = cert.add_subparsers(dest="certificate_command", required=True, metavar="ACTION")
    p = csub.add_parser("check", parents=[common], help="show every certificate and its status")
    _services_arg(p)
    p.add_argument("--output", "-o", choices=["text", "table", "json", "yaml"], default="text")
    _exit_codes_arg(p)
    p.set_defaults(handler=cmd_check)
    p = csub.add_parser("rotate", parents=[common], help="new keys and certificates now")
    _services_arg(p)
    p.set_defaults(handler=cmd_rotate)
    p = csub.add_parser("rotate-ca", parents=[common], help="check a staged CA set and save it")
    p.add_argument("--path", required=True, type=Path, help="staged dir (holds tls/...)")
    p.add_argument("--force", action="store_true",
                   help="skip the chain-of-trust and service-key checks (new root)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="check and report, save nothing")
    p.set_defaults(handler=cmd_rotate_ca)

    ca = sub.add_parser(
        "ca",
        parents=[common],
        help="make CA sets, as the CA scripts in RKE2's documentation do",
        description="Build CA sets as the example scripts in RKE2's documentation do: "
        "generate-custom as generate-custom-ca-certs.sh (custom root + intermediate), "
        "stage-rotation as rotate-default-ca-certs.sh (cross-signed rotation of the "
        "self-signed CAs), stage-service-key as the documented service-account key rotation. "
        "Load a staged set with `certificate rotate-ca`.",
    )
    casub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    p = casub.add_parser("generate-custom", parents=[common],
                         help="custom root+intermediate CA set")  # fmt: skip
    p.add_argument("--out", type=Path, help="target tls dir (default <data>/server/tls)")
    p.add_argument("--key-type", choices=["rsa4096", "ecdsa-p256"], default="rsa4096",
                   help="key type of a new root and intermediate")  # fmt: skip
    p.set_defaults(handler=cmd_generate_custom)
    p = casub.add_parser("stage-rotation", parents=[common],
                         help="cross-signed rotation of the self-signed CAs")  # fmt: skip
    p.add_argument("--out", type=Path, help="dir to make (default: a new dir beside the "
                   "staging dir, to be renamed into it)")  # fmt: skip
    p.set_defaults(handler=cmd_stage_rotation)
    p = casub.add_parser("stage-service-key", parents=[common],
                         help="a new service-account key, the current ones kept")  # fmt: skip
    p.add_argument("--out", type=Path, help="dir to make (default: a new dir beside the "
                   "staging dir, to be renamed into it)")  # fmt: skip
    p.set_defaults(handler=cmd_stage_service_key)

    p = sub.add_parser("run", parents=[common], help="the daemon (systemd Type=notify)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("token", parents=[common], help="show the join tokens or the CA hash")
    p.add_argument("what", nargs="?", choices=["show", "hash"], default="show")
    p.set_defaults(handler=cmd_token)

    _rollout_commands(sub, common)
    return parser


def _rollout_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`status`, `node remove`, `rollout resume`: the cluster-wide rollout (ops/status.py)."""
    p = sub.add_parser("status", parents=[common], help="the cluster's rollouts and nodes")
    p.add_argument("--output", "-o", choices=["table", "json"], default="table")
    _exit_codes_arg(p)
    p.set_defaults(handler=cmd_status)
    node = sub.add_parser("node", parents=[common], help="the node registry")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    p = nsub.add_parser("remove", parents=[common], help="remove a node for good: rollouts "
                        "stop waiting for it")  # fmt: skip
    p.add_argument("name", help="the node's name (as `rke2certd status` shows it)")
    p.add_argument("--force", action="store_true",
                   help="even if it looks registered (gone, lease not expired)")  # fmt: skip
    p.set_defaults(handler=cmd_node_remove)
    roll = sub.add_parser("rollout", parents=[common], help="act on a rollout")
    rsub = roll.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = rsub.add_parser("resume", parents=[common], help="go on with a stopped rollout")
    p.add_argument("id", help="the rollout id (as `rke2certd status` shows it)")
    p.set_defaults(handler=cmd_rollout_resume)


def _cluster_datastore(cfg: Config) -> Datastore:
    from rke2certd.ops.bootstrap import open_for
    from rke2certd.ops.renew import NeedsServerError, rke2_has_run

    if not cfg.is_server:
        raise NeedsServerError("this command reads the datastore: run it on a server")
    node = Node.from_config(cfg)
    if cfg.rke2_config is not None and not rke2_has_run(node.layout):
        raise _before_rke2()
    return open_for(node)


def _before_rke2() -> Rke2certdError:
    from rke2certd.errors import UsageError

    return UsageError(
        "RKE2 has not started on this node yet: it creates (first server) or fetches (joining "
        "server) the CA set and every certificate at its first start, and runs the datastore; "
        "run this once rke2-server has started"
    )


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    if args.exit_codes == "nagios":
        from rke2certd.ops.monitoring import status_plugin

        return status_plugin(cfg, args.output)
    from rke2certd.ops.status import render_status

    if not cfg.is_server:  # an agent reads the rollout keys through a server's endpoint
        from rke2certd.ops.agent import agent_token
        from rke2certd.ops.agent_rollout import remote_store

        node = Node.from_config(cfg)
        remote = remote_store(node, lambda: agent_token(node))
        where = "none on this agent-only node (read through a server's endpoint)"
        sys.stdout.write(
            render_status(remote, args.output, system_clock(), cfg.availability, where)
        )
        return 0
    from rke2certd.ops.rke2_datastore import plan_datastore

    where = plan_datastore(cfg, Node.from_config(cfg).layout).description
    with _cluster_datastore(cfg) as ds:
        sys.stdout.write(render_status(ds, args.output, system_clock(), cfg.availability, where))
    return 0


def cmd_node_remove(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.status import remove_node

    with _cluster_datastore(cfg) as ds:
        sys.stdout.write(remove_node(ds, args.name, force=args.force))
    return 0


def cmd_rollout_resume(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.status import resume_rollout

    with _cluster_datastore(cfg) as ds:
        sys.stdout.write(resume_rollout(ds, args.id))
    return 0


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "data-dir": getattr(args, "data_dir", None),
        "log-format": getattr(args, "log_format", None),
        "log-level": "debug" if getattr(args, "debug", False) else getattr(args, "log_level", None),
    }
    return load_config(getattr(args, "config", None), overrides)


def cmd_renew(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.render import render_renew
    from rke2certd.ops.renew import RenewResult, renew
    from rke2certd.store.lock import node_lock

    node = Node.from_config(cfg)
    result: RenewResult
    if cfg.rke2_config is not None:
        from rke2certd.ops.renew import before_first_start

        skipped = before_first_start(node, dry_run=args.dry_run)
        if skipped is not None:  # no lock taken, no dir made: RKE2's first start does it all
            sys.stdout.write(render_renew(skipped, args.output))
            return 0
    if not cfg.is_server:  # agent-only: certificates come from a server's endpoint
        from rke2certd.ops.agent_rollout import rejoin_renew
        from rke2certd.supervisor.client import UnreachableError

        try:
            if args.dry_run:
                result, _ = rejoin_renew(node, system_clock(), dry_run=True)
            else:
                with node_lock(cfg.data_dir, cfg.lock_timeout):
                    result, _ = rejoin_renew(node, system_clock())
                _warm_check_cache(node)
        except UnreachableError as exc:
            # A full restart: the servers may come up after this agent. With valid certificates
            # on disk, rke2-agent starts on them; the daemon renews once a server answers.
            if not args.offline_ok or not _certs_usable(node):
                raise
            from rke2certd.log import log

            why = f"{exc}; going on with the certificates on disk (--offline-ok)"
            log.warning("renew_deferred", reason=why)
            result = RenewResult(dry_run=args.dry_run, unit=_unit_of(node), skipped=why)
        sys.stdout.write(render_renew(result, args.output))
        return 0
    from rke2certd.ops.rke2_datastore import UnsupportedDatastoreError

    with ExitStack() as stack:
        try:
            ds = stack.enter_context(_datastore(node, offline_ok=args.offline_ok))
        except UnsupportedDatastoreError as exc:
            if not args.offline_ok:
                raise
            # The hook must not keep RKE2 from starting for what only disables rke2certd.
            print(f"rke2certd: error: {exc}", file=sys.stderr)
            print("rke2certd: RKE2 starts without rke2certd's renewal", file=sys.stderr)
            return 0
        if args.dry_run:
            result = renew(node, system_clock(), dry_run=True, datastore=ds)
        else:
            with node_lock(cfg.data_dir, cfg.lock_timeout):
                result = renew(node, system_clock(), datastore=ds)
                _node_files(node)
            _warm_check_cache(node)
    sys.stdout.write(render_renew(result, args.output))
    return 0


def _node_files(node: Node) -> None:
    """The startup hook's part for the files RKE2 writes itself: the admin kubeconfig brought
    up to date, and dynamiclistener's cert regenerated at RKE2's start when it must be."""
    from rke2certd.ops.node_files import refresh_admin_kubeconfig, request_dynamic_regenerate

    refresh_admin_kubeconfig(node)
    request_dynamic_regenerate(node, system_clock())


def _certs_usable(node: Node) -> bool:
    """Every certificate of the node is there and none is expired or not yet valid."""
    from rke2certd.ops.check import check
    from rke2certd.plan.inventory import failing

    try:
        result = check(node, [], system_clock())
    except Rke2certdError:
        return False
    return bool(result.rows) and not failing(result.rows) and not result.errors


def _unit_of(node: Node) -> str:
    from rke2certd.pki.profiles import AGENT_UNIT, SERVER_UNIT

    return SERVER_UNIT if node.cfg.is_server else AGENT_UNIT


def _warm_check_cache(node: Node) -> None:
    """Record the facts of the certs renew just wrote or kept (ops/cert_facts.py), so that the
    next `certificate check` reads no X.509. Costs ~1 ms when nothing changed; a cache only."""
    from rke2certd.ops.check import check

    # An error (a file renew left alone is unreadable) is `check`'s to report, not renew's.
    with suppress(Rke2certdError, OSError):
        check(node, [], system_clock())


@contextmanager
def _datastore(node: Node, offline_ok: bool = False) -> Iterator[Datastore | None]:
    """The node's datastore on a server (opened before any change, so an unreachable one fails
    fast and changes nothing); None on an agent-only node, on an RKE2 node before RKE2's first
    start (there is nothing to renew), or when `offline_ok` (the startup hook) allows going on
    without it: RKE2's embedded etcd is down until rke2-server starts, so the hook renews from
    a complete CA set on disk, or (RKE2 node) leaves a missing one to RKE2."""
    if not node.cfg.is_server:
        yield None
        return
    from rke2certd.datastore.base import DatastoreUnavailable
    from rke2certd.errors import DatastoreFilesMissing
    from rke2certd.ops.bootstrap import open_for
    from rke2certd.ops.ca_material import disk_generation
    from rke2certd.ops.renew import rke2_has_run

    rke2 = node.cfg.rke2_config is not None
    if rke2 and not rke2_has_run(node.layout):
        raise _before_rke2()
    try:
        ds = open_for(node)
    except (DatastoreUnavailable, DatastoreFilesMissing) as exc:
        if not offline_ok or (not rke2 and disk_generation(node.layout) is None):
            raise
        from rke2certd.ops.rke2_datastore import EmbeddedEtcdDown

        if not isinstance(exc, EmbeddedEtcdDown):  # that one is RKE2 being down: as expected
            from rke2certd.log import log

            log.warning(
                "datastore_unreachable",
                reason=f"{exc}; going on with the CA set on disk (--offline-ok)".replace("\n", " "),
            )
        yield None
        return
    try:
        yield ds
    finally:
        ds.close()


def cmd_rotate_ca(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.render import render_rotate_ca
    from rke2certd.ops.rotate_ca import rotate_ca

    node = Node.from_config(cfg)
    with _datastore(node) as ds:
        if ds is None:
            from rke2certd.ops.renew import NeedsServerError

            raise NeedsServerError("rotate-ca runs on a server (etcd or control-plane role)")
        result = rotate_ca(
            node, args.path, force=args.force, dry_run=args.dry_run, now=system_clock(),
            datastore=ds,
        )  # fmt: skip
        rollout = _start_ca_rollout(ds, cfg, result)
    sys.stdout.write(render_rotate_ca(result))
    if rollout is not None:
        sys.stdout.write(
            f"Rollout {rollout.id} started: the rke2certd daemons restart RKE2 in order "
            "(etcd, control-plane, agents); follow it with `rke2certd status`\n"
        )
    return 0


def _start_ca_rollout(ds: Datastore, cfg: Config, result: RotateCAResult) -> Rollout | None:
    """The rollout of a saved rotation; a failure to start it is reported, not fatal: the
    daemons start it themselves when they take the new CAs from the datastore."""
    from rke2certd.rollout.create import after_rotation

    why = f"rotate-ca --path {result.path} on {cfg.node}"
    try:
        return after_rotation(ds, cfg.node, result, why, system_clock())
    except Rke2certdError as exc:
        print(f"rke2certd: warning: rollout not started: {exc}", file=sys.stderr)
        return None


def cmd_generate_custom(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.generate import generate_custom
    from rke2certd.ops.render import render_generate

    out = args.out or cfg.data_dir / "server" / "tls"
    result = generate_custom(out, system_clock(), args.key_type, data_dir=cfg.data_dir)
    sys.stdout.write(render_generate(result))
    return 0


def _staging_out(args: argparse.Namespace, cfg: Config, what: str) -> Path:
    """`--out`, or a new dir beside the staging dir (same file system: a rename hands it to
    the daemon as it is)."""
    if args.out:
        out: Path = args.out
        return out
    stamp = system_clock().strftime("%Y%m%dT%H%M%SZ")
    return cfg.staging.parent / f"{what}-{stamp}"


def cmd_stage_rotation(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.datastore.codec import passphrase_from_token
    from rke2certd.ops.bootstrap import configured_token
    from rke2certd.ops.generate import stage_rotation
    from rke2certd.ops.render import render_generate

    node = Node.from_config(cfg)
    token = configured_token(cfg, node.layout)
    if token is None:
        from rke2certd.errors import TokenError

        raise TokenError("no server token on this node (token, token-file or server/token)")
    out = _staging_out(args, cfg, "ca-rotation")
    result = stage_rotation(
        cfg.data_dir, out, system_clock(), passphrase_from_token(token), staging=cfg.staging
    )
    sys.stdout.write(render_generate(result))
    return 0


def cmd_stage_service_key(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.generate import stage_service_key
    from rke2certd.ops.render import render_generate

    out = _staging_out(args, cfg, "service-key")
    result = stage_service_key(cfg.data_dir, out, staging=cfg.staging)
    sys.stdout.write(render_generate(result))
    return 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.daemon.loop import Daemon
    from rke2certd.log import output

    # The daemon configures logging now, not at its first rke2certd.log event (see log/):
    # libraries (watchdog, etcd clients) may log through stdlib logging first, and would
    # otherwise bypass the sink and the redaction.
    output.configure(cfg.log_format, cfg.log_level)
    first = [cfg]

    def load() -> Config:
        # The first load is the one main() made; a reload (SIGHUP) reads the file again.
        return first.pop() if first else _config(args)

    return Daemon(load).run()


def cmd_token(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.tokens import show_hash, show_tokens

    node = Node.from_config(cfg)
    sys.stdout.write(show_hash(node) if args.what == "hash" else show_tokens(node))
    return 0


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.check import RENDERERS, check
    from rke2certd.ops.rotate import parse_services
    from rke2certd.plan.inventory import failing

    services = parse_services(args.service)
    result = check(Node.from_config(cfg), services, system_clock())
    sys.stdout.write(RENDERERS[args.output](result))
    if args.exit_codes == "nagios":
        from rke2certd.plan.verdict import verdict

        return int(verdict(result.rows, result.errors, result.warnings, result.kubeconfigs).level)
    stale = any(k.critical for k in result.kubeconfigs)
    return 1 if failing(result.rows) or result.errors or stale else 0


def cmd_rotate(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.render import render_rotate
    from rke2certd.ops.rotate import parse_services, rotate
    from rke2certd.store.lock import node_lock

    services = parse_services(args.service)
    node = Node.from_config(cfg)
    if not cfg.is_server:  # agent-only: new keys, certificates signed through a server
        from rke2certd.ops.agent import agent_rotate

        with node_lock(cfg.data_dir, cfg.lock_timeout):
            result = agent_rotate(node, services, system_clock())
        sys.stdout.write(render_rotate(result))
        return 0
    with _datastore(node) as ds, node_lock(cfg.data_dir, cfg.lock_timeout):
        result = rotate(node, services, system_clock(), datastore=ds)
    sys.stdout.write(render_rotate(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args)
        log_setup(cfg.log_format, cfg.log_level)
        handler: Handler = args.handler
        return handler(args, cfg)
    except Rke2certdError as exc:
        print(f"rke2certd: error: {exc}", file=sys.stderr)
        if getattr(args, "exit_codes", "default") == "nagios":
            return 3  # UNKNOWN: the check itself could not run
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
