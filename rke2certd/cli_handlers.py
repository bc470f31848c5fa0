"""What each command of the command line does: one handler per command, each
`(args, config) -> exit status`. Output for people and scripts goes to stdout; logs to stderr.
Where a server and an agent-only node differ, the node's role (rke2certd/roles/) does."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rke2certd.clock import system_clock
from rke2certd.config import Config, load_config
from rke2certd.errors import Rke2certdError
from rke2certd.node.node import Node

if TYPE_CHECKING:
    from rke2certd.commands.rotate_ca import RotateCAResult
    from rke2certd.datastore.base import Datastore
    from rke2certd.plan.rollout import Rollout
    from rke2certd.roles import NodeRole

READS_DATASTORE = "this command reads the datastore: run it on a server"


def _role(cfg: Config) -> NodeRole:
    from rke2certd.roles import role_for

    return role_for(Node.from_config(cfg))


def config_of(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "data-dir": getattr(args, "data_dir", None),
        "log-format": getattr(args, "log_format", None),
        "log-level": "debug" if getattr(args, "debug", False) else getattr(args, "log_level", None),
    }
    return load_config(getattr(args, "config", None), overrides)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    if args.exit_codes == "nagios":
        from rke2certd.commands.monitoring import status_plugin

        return status_plugin(cfg, args.output)
    sys.stdout.write(_role(cfg).status(args.output, system_clock()))
    return 0


def cmd_node_remove(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.status import remove_node

    with _role(cfg).cluster_datastore(READS_DATASTORE) as ds:
        sys.stdout.write(remove_node(ds, args.name, force=args.force))
    return 0


def cmd_rollout_resume(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.status import resume_rollout

    with _role(cfg).cluster_datastore(READS_DATASTORE) as ds:
        sys.stdout.write(resume_rollout(ds, args.id))
    return 0


def cmd_renew(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.render import render_renew
    from rke2certd.node.rke2_datastore import UnsupportedDatastoreError

    node = Node.from_config(cfg)
    if cfg.rke2_config is not None:
        from rke2certd.commands.renew import before_first_start

        skipped = before_first_start(node, dry_run=args.dry_run)
        if skipped is not None:  # no lock taken, no dir made: RKE2's first start does it all
            sys.stdout.write(render_renew(skipped, args.output))
            return 0
    from rke2certd.roles import role_for

    try:
        result = role_for(node).renew_hook(dry_run=args.dry_run, offline_ok=args.offline_ok)
    except UnsupportedDatastoreError as exc:
        if not args.offline_ok:
            raise
        # The hook must not keep RKE2 from starting for what only disables rke2certd.
        print(f"rke2certd: error: {exc}", file=sys.stderr)
        print("rke2certd: RKE2 starts without rke2certd's renewal", file=sys.stderr)
        return 0
    sys.stdout.write(render_renew(result, args.output))
    return 0


def cmd_rotate_ca(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.render import render_rotate_ca
    from rke2certd.commands.rotate_ca import rotate_ca

    role = _role(cfg)
    with role.cluster_datastore("rotate-ca runs on a server (etcd or control-plane role)") as ds:
        result = rotate_ca(
            role.node,
            args.path,
            force=args.force,
            dry_run=args.dry_run,
            now=system_clock(),
            datastore=ds,
        )
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
        return after_rotation(ds, cfg.node, result.rollout_facts(), why, system_clock())
    except Rke2certdError as exc:
        print(f"rke2certd: warning: rollout not started: {exc}", file=sys.stderr)
        return None


def cmd_generate_custom(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.generate_custom import generate_custom
    from rke2certd.commands.render import render_generate

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
    from rke2certd.commands.render import render_generate
    from rke2certd.commands.stage_rotation import stage_rotation
    from rke2certd.datastore.codec import passphrase_from_token
    from rke2certd.node.bootstrap_data import configured_token

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
    from rke2certd.commands.render import render_generate
    from rke2certd.commands.stage_rotation import stage_service_key

    out = _staging_out(args, cfg, "service-key")
    result = stage_service_key(cfg.data_dir, out, staging=cfg.staging)
    sys.stdout.write(render_generate(result))
    return 0


def _seconds(name: str, default: float) -> float:
    """A test-only knob from the daemon's environment, read when the daemon starts."""
    value = os.environ.get(name)
    return float(value) if value else default


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.daemon.endpoint import LIMITS_EVERY
    from rke2certd.daemon.loop import Daemon
    from rke2certd.log import output
    from rke2certd.rollout.runner import RECHECK

    # The daemon configures logging now, not at its first rke2certd.log event (see log/):
    # libraries (watchdog, etcd clients) may log through stdlib logging first, and would
    # otherwise bypass the sink and the redaction.
    output.configure(cfg.log_format, cfg.log_level)
    first = [cfg]

    def load() -> Config:
        # The first load is the one main() made; a reload (SIGHUP) reads the file again.
        return first.pop() if first else config_of(args)

    # Tests shorten or lengthen these through the daemon's environment (read here, at its
    # start, not at import): the fleet-size look and the rollout's read without a wake-up.
    return Daemon(
        load,
        recheck=_seconds("RKE2CERTD_RECHECK_SECONDS", RECHECK),
        limits_every=_seconds("RKE2CERTD_LIMITS_SECONDS", LIMITS_EVERY),
    ).run()


def cmd_token(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.tokens import show_hash, show_tokens

    node = Node.from_config(cfg)
    sys.stdout.write(show_hash(node) if args.what == "hash" else show_tokens(node))
    return 0


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.commands.check import RENDERERS, check
    from rke2certd.commands.rotate import parse_services
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
    from rke2certd.commands.render import render_rotate
    from rke2certd.commands.rotate import parse_services

    services = parse_services(args.service)
    sys.stdout.write(render_rotate(_role(cfg).rotate(services, system_clock())))
    return 0
