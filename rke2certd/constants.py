"""Values more than one module needs, defined once. Nothing here imports anything of ours."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

# RKE2's data dir, the default of `data-dir` (config) and of `generate --data-dir`.
DEFAULT_DATA_DIR = Path("/var/lib/rancher/rke2")

# rke2certd's agent endpoint (`supervisor-port`): beside RKE2's own supervisor, which keeps its
# port, so both run on one server. Agents reach RKE2's at the `server:` URL of RKE2's config.
SUPERVISOR_PORT = 9346
RKE2_SUPERVISOR_PORT = 9345

# Where log events go (`log-format`, `--log-format`): `auto` picks one of the others at start.
LogFormat = Literal["auto", "journald", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
# What `log-format: auto` resolves to.
Sink = Literal["journald", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
