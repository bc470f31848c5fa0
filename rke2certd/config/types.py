"""The words every config module shares: roles, log choices, default paths, list values.

The bottom of the config package: it imports nothing of the package.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from rke2certd.constants import LogFormat, LogLevel

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_RKE2_CONFIG_DIR",
    "LogFormat",
    "LogLevel",
    "Role",
    "str_list",
]

DEFAULT_CONFIG = Path("/etc/rke2certd/config.yaml")
DEFAULT_RKE2_CONFIG_DIR = Path("/etc/rancher/rke2")


class Role(StrEnum):
    ETCD = "etcd"
    CONTROL_PLANE = "control-plane"
    AGENT = "agent"


def str_list(value: Any) -> Any:
    """RKE2 accepts a list or a comma-separated string for list keys."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value
