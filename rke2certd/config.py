"""Configuration: a YAML file with RKE2's own key names where RKE2 has one.

Precedence (low to high): defaults, RKE2's config (`rke2-config`, plus its `config.yaml.d`
drop-ins, shared keys only), our file, the command line.

`Config` is a plain frozen dataclass that the commands only read. Validation (pydantic, in
`config_model.py`) runs when an input changed: `load_config` keeps the validated values in the
cache dir (`config_cache.py`), keyed by the bytes of every file it read, so the startup hook
and `certificate check` import neither pydantic nor yaml on an unchanged node.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rke2certd.errors import ConfigError

if TYPE_CHECKING:
    from rke2certd.plan.rollout import Availability

DEFAULT_CONFIG = Path("/etc/rke2certd/config.yaml")
DEFAULT_DATA_DIR = Path("/var/lib/rancher/rke2")

# Keys that mean the same in RKE2's config.yaml and ours; only these are taken from it.
SHARED_KEYS = (
    "data-dir",
    "node-name",
    "node-ip",
    "advertise-address",
    "tls-san",
    "cluster-domain",
    "service-cidr",
    "token",
    "token-file",
    "server",
    "datastore-endpoint",
    "datastore-cafile",
    "datastore-certfile",
    "datastore-keyfile",
)


class Role(StrEnum):
    ETCD = "etcd"
    CONTROL_PLANE = "control-plane"
    AGENT = "agent"


LogFormat = Literal["auto", "journald", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """The validated configuration. Defaults and rules live in `config_model.ConfigModel`
    (the one place); build a Config with `load_config` or `Config.from_mapping`."""

    data_dir: Path
    node_name: str | None
    node_ip: list[str]
    advertise_address: str | None
    tls_san: list[str]
    cluster_domain: str
    service_cidr: list[str]
    token: str | None = field(repr=False)
    token_file: Path | None
    server: str | None
    datastore_endpoint: str
    datastore_cafile: Path | None
    datastore_certfile: Path | None
    datastore_keyfile: Path | None
    rke2_config: Path | None

    roles: list[Role]
    renew_before_days: int
    staging_dir: Path | None
    log_format: LogFormat
    log_level: LogLevel
    rescan_interval: float
    max_unavailable: int
    restart_command: list[str] | None
    health_command: list[str] | None
    supervisor_port: int
    lock_timeout: float
    # Rollout coordination (see rke2certd/rollout/).
    registry_ttl: int
    restart_timeout: float
    health_timeout: float
    health_etcd_endpoint: str
    health_apiserver_endpoint: str
    health_kubelet_endpoint: str
    staging_quiet: float
    # Defaults here too: a config cache written before these keys existed still loads.
    agent_unavailable_grace: float = 600.0
    agent_unavailable: Literal["skip", "wait"] = "skip"
    supervisor_bind_address: str = "0.0.0.0"

    # The config files that were read, lowest precedence first (RKE2's config, its drop-ins in
    # order, ours); the last one that sets a key wins. Not part of the configuration's value.
    sources: tuple[Path, ...] = field(default=(), compare=False)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], where: str | None = None) -> Config:
        """Validate a mapping with the YAML key names (`data-dir`, ...); defaults fill the rest.
        Raises ConfigError listing every problem."""
        from rke2certd.config_model import validate

        return _from_values(validate(doc, where), ())

    # Derived facts -------------------------------------------------------------------------

    @property
    def is_server(self) -> bool:
        return Role.ETCD in self.roles or Role.CONTROL_PLANE in self.roles

    @property
    def has_agent(self) -> bool:
        return Role.AGENT in self.roles

    @property
    def node(self) -> str:
        if self.node_name:
            return self.node_name.lower()
        import socket  # only here: ~4 ms to import, and most nodes set node-name

        return socket.gethostname().lower()

    @property
    def availability(self) -> Availability:
        """What a rollout does about a member not running when its turn comes."""
        from datetime import timedelta

        from rke2certd.plan.rollout import Availability, Unavailable

        grace = timedelta(seconds=self.agent_unavailable_grace)
        return Availability(grace, Unavailable(self.agent_unavailable))

    @property
    def renew_window_days(self) -> int:
        return self.renew_before_days

    @property
    def staging(self) -> Path:
        return self.staging_dir or self.data_dir / "server" / "rotate-ca" / "incoming"


_PATH_FIELDS = frozenset(
    {
        "data_dir",
        "token_file",
        "datastore_cafile",
        "datastore_certfile",
        "datastore_keyfile",
        "rke2_config",
        "staging_dir",
    }
)


def _from_values(values: Mapping[str, Any], sources: tuple[Path, ...]) -> Config:
    """A Config from validated values in their JSON form (ConfigModel.model_dump(mode="json")).
    A fresh load and a cache hit both go through here, so they cannot differ."""
    kw = dict(values)
    for name in _PATH_FIELDS:
        if kw[name] is not None:
            kw[name] = Path(kw[name])
    kw["roles"] = [Role(r) for r in kw["roles"]]
    return Config(**kw, sources=sources)


def _str_list(value: Any) -> Any:
    """RKE2 accepts a list or a comma-separated string for list keys."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


# Reading ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a load read: each file with the SHA-256 of its bytes (None: it does not exist),
    and each drop-in dir with its listing (None: not a dir). The cache key of config_cache."""

    files: list[tuple[str, str | None]] = field(default_factory=list)
    listings: list[tuple[str, list[str] | None]] = field(default_factory=list)
    relative: bool = False  # a relative path was resolved against the working directory

    @property
    def sources(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p, digest in self.files if digest is not None)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_input(path: Path, what: str, inputs: Inputs | None = None) -> bytes | None:
    """The bytes of a config file, None when it does not exist (recorded in `inputs`)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}", [exc.strerror or str(exc)]) from exc
    if inputs is not None:
        inputs.files.append((os.path.abspath(path), None if data is None else digest(data)))
    return data


def dropin_files(dropins: Path) -> list[Path] | None:
    """The `*.yaml` of RKE2's `config.yaml.d`, in merge order; None: no such dir."""
    if not dropins.is_dir():
        return None
    return sorted(dropins.glob("*.yaml"))


def _parse_yaml(data: bytes | None, path: Path, what: str) -> dict[str, Any]:
    if data is None:
        return {}
    import yaml

    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what} {path} is not valid YAML", [f"{problem}{where}"]) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} {path} is invalid", ["the top level must be a mapping"])
    return doc


def _read_yaml(path: Path, what: str, inputs: Inputs | None = None) -> dict[str, Any]:
    return _parse_yaml(read_input(path, what, inputs), path, what)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """RKE2's merge rule: a later file overrides; `key+:` appends to a list."""
    out = dict(base)
    for key, value in extra.items():
        if key.endswith("+"):
            k = key[:-1]
            old = _str_list(out.get(k, []))
            new = _str_list(value)
            out[k] = (old if isinstance(old, list) else [old]) + (
                new if isinstance(new, list) else [new]
            )
        else:
            out[key] = value
    return out


def read_rke2_config(path: Path, inputs: Inputs | None = None) -> dict[str, Any]:
    """RKE2's config.yaml and its config.yaml.d/*.yaml drop-ins, shared keys only."""
    merged = _read_yaml(path, "RKE2 config", inputs)
    dropins = path.parent / f"{path.name}.d"
    files = dropin_files(dropins)
    if inputs is not None:
        names = None if files is None else [f.name for f in files]
        inputs.listings.append((os.path.abspath(dropins), names))
    for f in files or ():
        merged = _merge(merged, _read_yaml(f, "RKE2 config drop-in", inputs))
    return {k: v for k, v in merged.items() if k in SHARED_KEYS}


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the configuration; every bad key is reported at once.

    Validated values are reused from the cache dir's cache when no input changed."""
    from rke2certd import config_cache

    explicit = path is not None
    env = os.environ.get("RKE2CERTD_CONFIG")
    path = path or Path(os.environ.get("RKE2CERTD_CONFIG", DEFAULT_CONFIG))
    if explicit and not path.exists():
        raise ConfigError(f"config file {path} does not exist", ["create it or drop --config"])
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    inputs = Inputs(relative=not path.is_absolute())
    ours_data = read_input(path, "config file", inputs)
    cache = config_cache.ConfigCache.for_load(path, given, env)
    if cache is not None:
        hit = cache.lookup(inputs)
        if hit is not None:
            try:
                return _from_values(*hit)
            except (KeyError, TypeError, ValueError):
                pass  # a damaged entry: validated afresh (and rewritten) below

    ours = _parse_yaml(ours_data, path, "config file")
    raw: dict[str, Any] = {}
    rke2_path = ours.get("rke2-config")
    if rke2_path:
        rke2 = Path(str(rke2_path))
        inputs.relative = inputs.relative or not rke2.is_absolute()
        raw = read_rke2_config(rke2, inputs)
    raw = _merge(raw, ours)
    raw.update(given)
    from rke2certd.config_model import validate

    values = validate(raw, str(path))
    # Lowest precedence first: RKE2's config and drop-ins were read before ours.
    files = inputs.files[1:] + inputs.files[:1]
    sources = Inputs(files=files).sources
    if cache is not None:
        cache.store(inputs, values, sources)
    return _from_values(values, sources)
