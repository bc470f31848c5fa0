"""Configuration: a YAML file with RKE2's own key names where RKE2 has one.

The package, bottom up (each module imports only those above it in this list):

    types     roles, log choices, default paths, list values
    validate  the rules as a pydantic model (imported only to validate)
    model     `Config`, the validated values the commands read
    sources   reading our file, RKE2's config and drop-ins, RKE2's units
    cache     validated values kept in the cache dir, keyed by every input's bytes
    load      `load_config`: sources -> cache hit, or validate -> cache

The names below are the package's interface; import them from `rke2certd.config`.
"""

from __future__ import annotations

from rke2certd.config.load import load_config
from rke2certd.config.model import Config
from rke2certd.config.types import DEFAULT_CONFIG, LogFormat, LogLevel, Role

__all__ = ["DEFAULT_CONFIG", "Config", "LogFormat", "LogLevel", "Role", "load_config"]
