"""The validated-config cache: `load_config` without yaml or pydantic when no input changed.

One file per way of loading (config path, RKE2CERTD_CONFIG, command-line overrides) in the
cache dir (store/private_cache.py), `config-<hash>.json`, holding the validated values and what they
were made from: the SHA-256 of every file read (ours, RKE2's config, each drop-in; "missing"
counts too), each drop-in dir's listing, and the code that validated them. A hit is checked by
hashing the files' raw bytes again, so an edited file, an added or removed drop-in, or an
upgrade is a miss: the config is read and validated afresh (errors and all) and the entry
rewritten. The entry holds the token: the file is 0600 in a root-only dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rke2certd import __version__
from rke2certd.config.sources import (
    RKE2_CONFIG_ENV,
    UNIT_DIRS_ENV,
    Inputs,
    digest,
    dropin_files,
    read_input,
)
from rke2certd.errors import ConfigError
from rke2certd.store.private_cache import cache_dir, read_private, write_private

FORMAT = 1
_HERE = Path(__file__).resolve().parent
# The code that reads and validates: this package and the constants its defaults come from.
_CODE = (_HERE.parent / "constants.py",)


def _code_digest() -> str | None:
    """The validating code's identity: a changed rule or default must not reuse old values."""
    ours = sorted(_HERE.glob("*.py"))
    try:
        parts = [f.read_bytes() for f in (*ours, *_CODE)]
    except OSError:
        parts = []
    if not ours or not parts:
        return None  # no sources to hash (a frozen build): do not cache
    return digest(b"\0".join([__version__.encode(), *parts]))


class ConfigCache:
    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = path
        self.key = key

    @classmethod
    def for_load(
        cls, config: Path, overrides: dict[str, Any], env: str | None
    ) -> ConfigCache | None:
        """The cache of this way of loading; None when caching is off or impossible."""
        base = cache_dir()
        code = _code_digest()
        if base is None or code is None:
            return None
        key = {
            "format": FORMAT,
            "code": code,
            "config": os.path.abspath(config),
            "env": env,
            # the defaults of RKE2's config and of the unit dirs (see sources.py)
            "rke2_env": os.environ.get(RKE2_CONFIG_ENV),
            "units_env": os.environ.get(UNIT_DIRS_ENV),
            "overrides": {k: str(v) for k, v in sorted(overrides.items())},
        }
        name = digest(json.dumps(key, sort_keys=True).encode())[:32]
        return cls(base / f"config-{name}.json", key)

    def lookup(self, inputs: Inputs) -> tuple[dict[str, Any], tuple[Path, ...]] | None:
        """(values, sources) when the entry matches `inputs` (our file, already read) and every
        other file it was made from still has the same bytes; None otherwise."""
        data = read_private(self.path)
        if data is None:
            return None
        try:
            entry = json.loads(data)
            if not isinstance(entry, dict) or entry.get("key") != self.key:
                return None
            if entry["cwd"] is not None and entry["cwd"] != os.getcwd():
                return None  # a relative path would now name another file
            files = [tuple(f) for f in entry["files"]]
            if not files or files[0] != inputs.files[0]:
                return None
            for path, want in files[1:]:
                if _digest_of(Path(path)) != want:
                    return None
            for where, names in entry["listings"]:
                if _listing(Path(where)) != names:
                    return None
            values = entry["values"]
            sources = tuple(Path(p) for p in entry["sources"])
            if not isinstance(values, dict):
                return None
        except (ValueError, TypeError, KeyError, IndexError):
            return None  # a damaged entry: the load below rewrites it
        return values, sources

    def store(self, inputs: Inputs, values: dict[str, Any], sources: tuple[Path, ...]) -> None:
        entry = {
            "key": self.key,
            "cwd": os.getcwd() if inputs.relative else None,
            "files": inputs.files,
            "listings": inputs.listings,
            "values": values,
            "sources": [str(p) for p in sources],
        }
        write_private(self.path, json.dumps(entry, sort_keys=True).encode())


def _digest_of(path: Path) -> str | None:
    try:
        data = read_input(path, "config file")
    except ConfigError:
        return "unreadable"  # never equal to a stored digest: the load reports the error
    return None if data is None else digest(data)


def _listing(dropins: Path) -> list[str] | None:
    files = dropin_files(dropins)
    return None if files is None else [f.name for f in files]
