"""The command line's parser: every command, its options and the handler it runs
(rke2certd/cli_handlers.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rke2certd import __version__
from rke2certd.cli_handlers import (
    cmd_check,
    cmd_generate_custom,
    cmd_node_remove,
    cmd_renew,
    cmd_rollout_resume,
    cmd_rotate,
    cmd_rotate_ca,
    cmd_run,
    cmd_stage_rotation,
    cmd_stage_service_key,
    cmd_status,
    cmd_token,
)
from rke2certd.constants import LOG_FORMATS, LOG_LEVELS


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (as `rke2 certificate … -d DIR`)."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=s,
        help="config file (default /etc/rke2certd/config.yaml; missing = defaults)",
    )
    p.add_argument("--data-dir", "-d", type=Path, default=s, help="RKE2 data dir")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=s)
    p.add_argument("--log-level", choices=LOG_LEVELS, default=s)
    p.add_argument("--debug", action="store_true", default=s, help="same as --log-level debug")
    return p


def _services_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--service",
        "-s",
        action="append",
        default=[],
        metavar="SVC[,SVC]",
        help="limit to these services (repeatable, comma lists)",
    )


def _exit_codes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exit-codes",
        choices=["default", "nagios"],
        default="default",
        help="nagios: exit 0 OK, 1 warning, 2 critical, 3 unknown (monitoring "
        "plugins); default: today's codes",
    )


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
    p.add_argument(
        "--offline-ok",
        action="store_true",
        help="datastore unreachable but the CA set complete on disk: renew from "
        "it (ExecStartPre= with embedded etcd)",
    )
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
    p.add_argument(
        "--force",
        action="store_true",
        help="skip the chain-of-trust and service-key checks (new root)",
    )
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
    p = casub.add_parser(
        "generate-custom", parents=[common], help="custom root+intermediate CA set"
    )
    p.add_argument("--out", type=Path, help="target tls dir (default <data>/server/tls)")
    p.add_argument(
        "--key-type",
        choices=["rsa4096", "ecdsa-p256"],
        default="rsa4096",
        help="key type of a new root and intermediate",
    )
    p.set_defaults(handler=cmd_generate_custom)
    p = casub.add_parser(
        "stage-rotation", parents=[common], help="cross-signed rotation of the self-signed CAs"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="dir to make (default: a new dir beside the staging dir, to be renamed into it)",
    )
    p.set_defaults(handler=cmd_stage_rotation)
    p = casub.add_parser(
        "stage-service-key",
        parents=[common],
        help="a new service-account key, the current ones kept",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="dir to make (default: a new dir beside the staging dir, to be renamed into it)",
    )
    p.set_defaults(handler=cmd_stage_service_key)

    p = sub.add_parser("run", parents=[common], help="the daemon (systemd Type=notify)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("token", parents=[common], help="show the join tokens or the CA hash")
    p.add_argument("what", nargs="?", choices=["show", "hash"], default="show")
    p.set_defaults(handler=cmd_token)

    _rollout_commands(sub, common)
    return parser


def _rollout_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`status`, `node remove`, `rollout resume`: the cluster-wide rollout (commands/status.py)."""
    p = sub.add_parser("status", parents=[common], help="the cluster's rollouts and nodes")
    p.add_argument("--output", "-o", choices=["table", "json"], default="table")
    _exit_codes_arg(p)
    p.set_defaults(handler=cmd_status)
    node = sub.add_parser("node", parents=[common], help="the node registry")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    p = nsub.add_parser(
        "remove", parents=[common], help="remove a node for good: rollouts stop waiting for it"
    )
    p.add_argument("name", help="the node's name (as `rke2certd status` shows it)")
    p.add_argument(
        "--force", action="store_true", help="even if it looks registered (gone, lease not expired)"
    )
    p.set_defaults(handler=cmd_node_remove)
    roll = sub.add_parser("rollout", parents=[common], help="act on a rollout")
    rsub = roll.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = rsub.add_parser("resume", parents=[common], help="go on with a stopped rollout")
    p.add_argument("id", help="the rollout id (as `rke2certd status` shows it)")
    p.set_defaults(handler=cmd_rollout_resume)
