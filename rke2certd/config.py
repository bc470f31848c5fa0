"""Configuration: a YAML file with RKE2's own key names where RKE2 has one.

Precedence (low to high): defaults, RKE2's config (`rke2-config`, plus its `config.yaml.d`
drop-ins, shared keys only), our file, the command line.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

# rke2certd uses no pydantic plugins; looking them up (importlib.metadata) costs ~10 ms at every
# start, and the startup hook runs before every RKE2 start.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from rke2certd.errors import ConfigError

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


def _str_list(value: Any) -> Any:
    """RKE2 accepts a list or a comma-separated string for list keys."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


StrList = Annotated[list[str], BeforeValidator(_str_list)]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    data_dir: Path = Field(DEFAULT_DATA_DIR, alias="data-dir")
    node_name: str | None = Field(None, alias="node-name")
    node_ip: StrList = Field(default_factory=list, alias="node-ip")
    advertise_address: str | None = Field(None, alias="advertise-address")
    tls_san: StrList = Field(default_factory=list, alias="tls-san")
    cluster_domain: str = Field("cluster.local", alias="cluster-domain")
    service_cidr: StrList = Field(default_factory=lambda: ["10.43.0.0/16"], alias="service-cidr")
    token: str | None = Field(None, alias="token", repr=False)
    token_file: Path | None = Field(None, alias="token-file")
    server: str | None = Field(None, alias="server")
    datastore_endpoint: str = Field("", alias="datastore-endpoint")
    datastore_cafile: Path | None = Field(None, alias="datastore-cafile")
    datastore_certfile: Path | None = Field(None, alias="datastore-certfile")
    datastore_keyfile: Path | None = Field(None, alias="datastore-keyfile")
    rke2_config: Path | None = Field(None, alias="rke2-config")

    roles: list[Role] = Field(default_factory=lambda: [Role.ETCD, Role.CONTROL_PLANE, Role.AGENT])
    renew_before_days: int = Field(90, alias="renew-before-days", ge=1, le=364)
    staging_dir: Path | None = Field(None, alias="staging-dir")
    log_format: Literal["auto", "journald", "json", "console"] = Field("auto", alias="log-format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", alias="log-level")
    rescan_interval: float = Field(3600, alias="rescan-interval", gt=0)
    max_unavailable: int = Field(1, alias="max-unavailable", ge=1)
    restart_command: list[str] | None = Field(None, alias="restart-command")
    health_command: list[str] | None = Field(None, alias="health-command")
    supervisor_port: int = Field(9346, alias="supervisor-port", ge=1, le=65535)
    lock_timeout: float = Field(120, alias="lock-timeout", gt=0)
    # Rollout coordination (see rke2certd/rollout/).
    registry_ttl: int = Field(30, alias="registry-ttl", ge=2, le=600)
    restart_timeout: float = Field(600, alias="restart-timeout", gt=0)
    health_timeout: float = Field(300, alias="health-timeout", gt=0)
    health_etcd_endpoint: str = Field("https://127.0.0.1:2379", alias="health-etcd-endpoint")
    health_apiserver_endpoint: str = Field(
        "https://127.0.0.1:6443", alias="health-apiserver-endpoint"
    )
    health_kubelet_endpoint: str = Field("https://127.0.0.1:10250", alias="health-kubelet-endpoint")
    staging_quiet: float = Field(5.0, alias="staging-quiet", ge=0)
    # the config files read, in precedence order (not a key: set by load_config)
    sources: tuple[Path, ...] = Field((), exclude=True)

    @field_validator("node_ip", "tls_san")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        return [x for x in v if x]

    @field_validator("service_cidr")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR such as 10.43.0.0/16") from None
        return v

    @field_validator("restart_command", "health_command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError("an argv list with the program first, e.g. [systemctl, restart, x]")
        return v

    @field_validator("health_etcd_endpoint", "health_apiserver_endpoint", "health_kubelet_endpoint")
    @classmethod
    def _https_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"{v!r} is not an https://host:port URL")
        return v.rstrip("/")

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[Role]) -> list[Role]:
        if not v:
            raise ValueError("at least one role is needed (etcd, control-plane, agent)")
        return sorted(set(v), key=list(Role).index)

    # Derived facts -------------------------------------------------------------------------

    @property
    def is_server(self) -> bool:
        return Role.ETCD in self.roles or Role.CONTROL_PLANE in self.roles

    @property
    def has_agent(self) -> bool:
        return Role.AGENT in self.roles

    @property
    def node(self) -> str:
        return (self.node_name or socket.gethostname()).lower()

    @property
    def renew_window_days(self) -> int:
        return self.renew_before_days

    @property
    def staging(self) -> Path:
        return self.staging_dir or self.data_dir / "server" / "rotate-ca" / "incoming"


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}", [exc.strerror or str(exc)]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what} {path} is not valid YAML", [f"{problem}{where}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is invalid", ["the top level must be a mapping"])
    return data


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


def read_rke2_config(path: Path) -> dict[str, Any]:
    """RKE2's config.yaml and its config.yaml.d/*.yaml drop-ins, shared keys only."""
    merged = _read_yaml(path, "RKE2 config")
    dropins = path.parent / f"{path.name}.d"
    if dropins.is_dir():
        for f in sorted(dropins.glob("*.yaml")):
            merged = _merge(merged, _read_yaml(f, "RKE2 config drop-in"))
    return {k: v for k, v in merged.items() if k in SHARED_KEYS}


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the configuration; every bad key is reported at once."""
    explicit = path is not None
    path = path or Path(os.environ.get("RKE2CERTD_CONFIG", DEFAULT_CONFIG))
    if explicit and not path.exists():
        raise ConfigError(f"config file {path} does not exist", ["create it or drop --config"])
    ours = _read_yaml(path, "config file")
    raw: dict[str, Any] = {}
    sources: list[Path] = []
    rke2_path = ours.get("rke2-config")
    if rke2_path:
        raw = read_rke2_config(Path(str(rke2_path)))
        rke2 = Path(str(rke2_path))
        sources = [rke2, *sorted((rke2.parent / f"{rke2.name}.d").glob("*.yaml"))]
    sources.append(path)
    raw = _merge(raw, ours)
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    if "sources" in raw:
        raise ConfigError(f"invalid configuration in {path}", ["sources: unknown key"])
    try:
        return Config.model_validate(raw).model_copy(update={"sources": tuple(sources)})
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration in {path}", _describe(exc)) from None


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see config.example.yaml for the keys rke2certd reads)"
        problems.append(f"{key}: {msg}")
    return problems
