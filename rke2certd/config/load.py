"""`load_config`: the configuration from its sources, validated, or from the cache.

Precedence (low to high): defaults, RKE2's config (`rke2-config`, plus its `config.yaml.d`
drop-ins, shared keys only), our file, the command line. Validation (pydantic, validate.py) runs
when an input changed: the validated values are kept in the cache dir (cache.py), keyed by the
bytes of every file read, so the startup hook and `certificate check` import neither pydantic
nor yaml on an unchanged node. RKE2CERTD_CONFIG names our file when no path is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rke2certd.config.cache import ConfigCache
from rke2certd.config.model import Config, from_values
from rke2certd.config.sources import (
    ROLE_KEYS,
    SHARED_KEYS,
    Inputs,
    dropin_files,
    installed_units,
    merge,
    parse_yaml,
    read_input,
    read_rke2_config,
    rke2_config_path,
    rke2_roles,
)
from rke2certd.config.types import DEFAULT_CONFIG
from rke2certd.errors import ConfigError

CONFIG_ENV = "RKE2CERTD_CONFIG"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the configuration; every bad key is reported at once.

    Validated values are reused from the cache dir's cache when no input changed."""
    explicit = path is not None
    env = os.environ.get(CONFIG_ENV)
    path = path or Path(env if env is not None else DEFAULT_CONFIG)
    if explicit and not path.exists():
        raise ConfigError(f"config file {path} does not exist", ["create it or drop --config"])
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    inputs = Inputs(relative=not path.is_absolute())
    ours_data = read_input(path, "config file", inputs)
    cache = ConfigCache.for_load(path, given, env)
    if cache is not None:
        hit = cache.lookup(inputs)
        if hit is not None:
            try:
                return from_values(*hit)
            except (KeyError, TypeError, ValueError):
                pass  # a damaged entry: validated afresh (and rewritten) below

    ours = parse_yaml(ours_data, path, "config file")
    raw: dict[str, Any] = {}
    role_flags: dict[str, Any] = {}
    rke2 = rke2_config_path(ours)
    if rke2 is not None:
        inputs.relative = inputs.relative or not rke2.is_absolute()
        rke2_doc = read_rke2_config(rke2, inputs)
        if not rke2.is_file() and not dropin_files(rke2.parent / f"{rke2.name}.d"):
            rke2 = None  # no RKE2 config there: a standalone node
        raw = {k: v for k, v in rke2_doc.items() if k in SHARED_KEYS}
        role_flags = {k: v for k, v in rke2_doc.items() if k in ROLE_KEYS}
    raw = merge(raw, ours)
    raw.update(given)
    raw["rke2-config"] = str(rke2) if rke2 is not None else None
    if rke2 is not None and "roles" not in raw:
        raw["roles"] = rke2_roles(role_flags, installed_units(inputs), rke2)
    # Imported only now, for its cost (pydantic): an unchanged node never validates.
    from rke2certd.config.validate import validate

    values = validate(raw, str(path))
    # Lowest precedence first: RKE2's config and drop-ins were read before ours.
    files = inputs.files[1:] + inputs.files[:1]
    sources = Inputs(files=files, facts=inputs.facts).sources
    if cache is not None:
        cache.store(inputs, values, sources)
    return from_values(values, sources)
