"""The command line. Output for people and scripts goes to stdout; logs go to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rke2certd import __version__, logs
from rke2certd.clock import system_clock
from rke2certd.config import Config, load_config
from rke2certd.errors import Rke2certdError
from rke2certd.ops.node import Node
from rke2certd.store.lock import node_lock

Handler = Callable[[argparse.Namespace, Config], int]


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (as `rke2 certificate … -d DIR`)."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--config", "-c", type=Path, default=s, help="config file "
                   "(default /etc/rke2certd/config.yaml; missing = defaults)")  # fmt: skip
    p.add_argument("--data-dir", "-d", type=Path, default=s, help="RKE2 data dir")
    p.add_argument("--log-format", choices=["auto", "journald", "json", "console"], default=s)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=s)
    p.add_argument("--debug", action="store_true", default=s, help="same as --log-level debug")
    return p


def _services_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", "-s", action="append", default=[], metavar="SVC[,SVC]",
                   help="limit to these services (repeatable, comma lists)")  # fmt: skip


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
    p.set_defaults(handler=cmd_renew)

    cert = sub.add_parser("certificate", parents=[common], help="check / rotate certificates")
    csub = cert.add_subparsers(dest="certificate_command", required=True, metavar="ACTION")
    p = csub.add_parser("check", parents=[common], help="show every certificate and its status")
    _services_arg(p)
    p.add_argument("--output", "-o", choices=["text", "table", "json", "yaml"], default="text")
    p.set_defaults(handler=cmd_check)
    p = csub.add_parser("rotate", parents=[common], help="new keys and certificates now")
    _services_arg(p)
    p.set_defaults(handler=cmd_rotate)
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "data-dir": getattr(args, "data_dir", None),
        "log-format": getattr(args, "log_format", None),
        "log-level": "debug" if getattr(args, "debug", False) else getattr(args, "log_level", None),
    }
    return load_config(getattr(args, "config", None), overrides)


def cmd_renew(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.render import render_renew
    from rke2certd.ops.renew import renew

    node = Node.from_config(cfg)
    if args.dry_run:
        result = renew(node, system_clock(), dry_run=True)
    else:
        with node_lock(cfg.data_dir, cfg.lock_timeout):
            result = renew(node, system_clock())
    sys.stdout.write(render_renew(result, args.output))
    return 0


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.check import RENDERERS, check
    from rke2certd.ops.rotate import parse_services
    from rke2certd.plan.inventory import failing

    services = parse_services(args.service)
    result = check(Node.from_config(cfg), services, system_clock())
    sys.stdout.write(RENDERERS[args.output](result))
    return 1 if failing(result.rows) or result.errors else 0


def cmd_rotate(args: argparse.Namespace, cfg: Config) -> int:
    from rke2certd.ops.render import render_rotate
    from rke2certd.ops.rotate import parse_services, rotate

    services = parse_services(args.service)
    with node_lock(cfg.data_dir, cfg.lock_timeout):
        result = rotate(Node.from_config(cfg), services, system_clock())
    sys.stdout.write(render_rotate(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args)
        logs.configure(cfg.log_format, cfg.log_level)
        handler: Handler = args.handler
        return handler(args, cfg)
    except Rke2certdError as exc:
        print(f"rke2certd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
