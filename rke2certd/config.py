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
DEFAULT_RKE2_CONFIG_DIR = Path("/etc/rancher/rke2")
# RKE2's own config: used when it exists, unless `rke2-config` says otherwise ("" = none).
# RKE2CERTD_RKE2_CONFIG replaces this default (tests; a node with RKE2 elsewhere).
DEFAULT_RKE2_CONFIG = DEFAULT_RKE2_CONFIG_DIR / "config.yaml"
RKE2_CONFIG_ENV = "RKE2CERTD_RKE2_CONFIG"
# Where systemd unit files are installed; RKE2CERTD_UNIT_DIRS (a `:` list) replaces it.
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
UNIT_DIRS_ENV = "RKE2CERTD_UNIT_DIRS"

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
    "write-kubeconfig",
)
# RKE2 keys that decide this node's roles (when our config sets no `roles`).
ROLE_KEYS = ("disable-etcd", "disable-apiserver", "disable-controller-manager", "disable-scheduler")


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
    node_password_file: Path
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
    # The daemon's pauses between attempts while its datastore does not answer: the first,
    # doubled up to the longest.
    datastore_retry_min: float
    datastore_retry_max: float
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
    # Monitoring: "" = no metrics endpoint; None = no node_exporter textfile.
    metrics_address: str
    textfile_dir: Path | None
    watch_files: list[str]
    write_kubeconfig: Path | None
    # Defaults here too: a config cache written before these keys existed still loads.
    agent_unavailable_grace: float = 600.0
    agent_unavailable: Literal["skip", "wait"] = "skip"
    supervisor_bind_address: str = "0.0.0.0"
    preferred_server_retry: float = 30.0

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
    def kubeconfig_file(self) -> Path:
        """The admin kubeconfig RKE2 writes (`write-kubeconfig`; default rke2.yaml beside
        RKE2's config.yaml)."""
        if self.write_kubeconfig is not None:
            return self.write_kubeconfig
        base = self.rke2_config.parent if self.rke2_config else DEFAULT_RKE2_CONFIG_DIR
        return base / "rke2.yaml"

    @property
    def staging(self) -> Path:
        return self.staging_dir or self.data_dir / "server" / "rotate-ca" / "incoming"


_PATH_FIELDS = frozenset(
    {
        "data_dir",
        "token_file",
        "node_password_file",
        "datastore_cafile",
        "datastore_certfile",
        "datastore_keyfile",
        "rke2_config",
        "staging_dir",
        "textfile_dir",
        "write_kubeconfig",
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
    # Files read for a fact, not as configuration (RKE2's unit files): cache inputs, never
    # `sources` (which the token rewrite after a CA rotation edits).
    facts: set[str] = field(default_factory=set)

    @property
    def sources(self) -> tuple[Path, ...]:
        return tuple(
            Path(p) for p, digest in self.files if digest is not None and p not in self.facts
        )


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
    return {k: v for k, v in merged.items() if k in SHARED_KEYS or k in ROLE_KEYS}


def rke2_config_path(ours: Mapping[str, Any]) -> Path | None:
    """Where RKE2's config is: our `rke2-config` key (empty: none), else RKE2CERTD_RKE2_CONFIG
    (empty: none), else /etc/rancher/rke2/config.yaml. Used only if it (or a drop-in) exists."""
    if "rke2-config" in ours:
        value = ours["rke2-config"]
        return Path(str(value)) if value else None
    env = os.environ.get(RKE2_CONFIG_ENV)
    if env is not None:
        return Path(env) if env else None
    return DEFAULT_RKE2_CONFIG


def unit_dirs() -> tuple[Path, ...]:
    env = os.environ.get(UNIT_DIRS_ENV)
    if env is None:
        return UNIT_DIRS
    return tuple(Path(p) for p in env.split(":") if p)


def installed_units(inputs: Inputs | None = None) -> frozenset[str]:
    """Which of rke2-server / rke2-agent this node runs: the enabled one(s) (RKE2's tarball
    installs both unit files, `systemctl enable` picks one), else the installed one(s) (the
    RPMs install one each). Every file looked at is recorded in `inputs`, so that enabling,
    installing or removing a unit invalidates the cached config."""
    enabled: set[str] = set()
    installed: set[str] = set()
    for unit in ("rke2-server", "rke2-agent"):
        for d in unit_dirs():
            wants = d / "multi-user.target.wants" / f"{unit}.service"
            for path, found in ((wants, enabled), (d / f"{unit}.service", installed)):
                if inputs is not None:
                    inputs.facts.add(os.path.abspath(path))
                if read_input(path, "systemd unit", inputs) is not None:
                    found.add(unit)
    return frozenset(enabled or installed)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def rke2_roles(flags: Mapping[str, Any], units: frozenset[str], where: Path) -> list[str]:
    """This node's roles as RKE2 runs it: an agent-only node when rke2-agent is its only unit
    (see installed_units); a server otherwise (it runs a kubelet too), with etcd unless
    `disable-etcd`, and the control plane unless every one of its components is disabled."""
    if "rke2-agent" in units and "rke2-server" not in units:
        return [Role.AGENT.value]
    roles = []
    if not _flag(flags.get("disable-etcd")):
        roles.append(Role.ETCD.value)
    cp = ("disable-apiserver", "disable-controller-manager", "disable-scheduler")
    if not all(_flag(flags.get(k)) for k in cp):
        roles.append(Role.CONTROL_PLANE.value)
    if not roles:
        raise ConfigError(
            f"RKE2 config {where} disables etcd and every control-plane component",
            [
                "a server needs etcd or a control-plane component; fix RKE2's config, or set "
                "`roles` in rke2certd's config"
            ],
        )
    return [*roles, Role.AGENT.value]


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
    role_flags: dict[str, Any] = {}
    rke2 = rke2_config_path(ours)
    if rke2 is not None:
        inputs.relative = inputs.relative or not rke2.is_absolute()
        rke2_doc = read_rke2_config(rke2, inputs)
        if not rke2.is_file() and not dropin_files(rke2.parent / f"{rke2.name}.d"):
            rke2 = None  # no RKE2 config there: a standalone node
        raw = {k: v for k, v in rke2_doc.items() if k in SHARED_KEYS}
        role_flags = {k: v for k, v in rke2_doc.items() if k in ROLE_KEYS}
    raw = _merge(raw, ours)
    raw.update(given)
    raw["rke2-config"] = str(rke2) if rke2 is not None else None
    if rke2 is not None and "roles" not in raw:
        raw["roles"] = rke2_roles(role_flags, installed_units(inputs), rke2)
    from rke2certd.config_model import validate

    values = validate(raw, str(path))
    # Lowest precedence first: RKE2's config and drop-ins were read before ours.
    files = inputs.files[1:] + inputs.files[:1]
    sources = Inputs(files=files, facts=inputs.facts).sources
    if cache is not None:
        cache.store(inputs, values, sources)
    return _from_values(values, sources)
