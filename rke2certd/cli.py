"""The command line: parse (cli_parser.py), load the config, run the command's handler
(cli_handlers.py). Output for people and scripts goes to stdout; logs go to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rke2certd.cli_handlers import config_of
from rke2certd.cli_parser import build_parser
from rke2certd.config import Config
from rke2certd.errors import Rke2certdError
from rke2certd.log import setup as log_setup

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace, Config], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_of(args)
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
