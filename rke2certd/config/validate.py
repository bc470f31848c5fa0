"""The configuration's rules: keys, defaults, types and checks, as a pydantic model.

Imported only to validate (a changed config, `Config.from_mapping`): pydantic costs ~60 ms at
import, and the startup hook runs before every RKE2 start. The result is the values that
`model.from_values` makes a `Config` of.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from rke2certd.config.types import LogFormat, LogLevel, Role, str_list
from rke2certd.constants import DEFAULT_DATA_DIR, SUPERVISOR_PORT
from rke2certd.errors import ConfigError
from rke2certd.plan.listen import parse_listen

StrList = Annotated[list[str], BeforeValidator(str_list)]


class ConfigModel(BaseModel):
    """Field names are `model.Config`'s; aliases are the YAML keys."""

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
    # An agent's node password (RKE2's file; created at first need, mode 0600).
    node_password_file: Path = Field(Path("/etc/rancher/node/password"), alias="node-password-file")
    datastore_endpoint: str = Field("", alias="datastore-endpoint")
    datastore_cafile: Path | None = Field(None, alias="datastore-cafile")
    datastore_certfile: Path | None = Field(None, alias="datastore-certfile")
    datastore_keyfile: Path | None = Field(None, alias="datastore-keyfile")
    rke2_config: Path | None = Field(None, alias="rke2-config")

    roles: list[Role] = Field(default_factory=lambda: [Role.ETCD, Role.CONTROL_PLANE, Role.AGENT])
    renew_before_days: int = Field(90, alias="renew-before-days", ge=1, le=364)
    staging_dir: Path | None = Field(None, alias="staging-dir")
    log_format: LogFormat = Field("auto", alias="log-format")
    log_level: LogLevel = Field("info", alias="log-level")
    rescan_interval: float = Field(3600, alias="rescan-interval", gt=0)
    datastore_retry_min: float = Field(2, alias="datastore-retry-min", gt=0)
    datastore_retry_max: float = Field(30, alias="datastore-retry-max", gt=0)
    max_unavailable: int = Field(1, alias="max-unavailable", ge=1)
    restart_command: list[str] | None = Field(None, alias="restart-command")
    health_command: list[str] | None = Field(None, alias="health-command")
    supervisor_port: int = Field(SUPERVISOR_PORT, alias="supervisor-port", ge=1, le=65535)
    supervisor_bind_address: str = Field("0.0.0.0", alias="supervisor-bind-address")
    lock_timeout: float = Field(120, alias="lock-timeout", gt=0)
    # Rollout coordination (see rke2certd/rollout/).
    registry_ttl: int = Field(30, alias="registry-ttl", ge=2, le=600)
    restart_timeout: float = Field(600, alias="restart-timeout", gt=0)
    health_timeout: float = Field(300, alias="health-timeout", gt=0)
    agent_unavailable_grace: float = Field(600, alias="agent-unavailable-grace", ge=0)
    agent_unavailable: Literal["skip", "wait"] = Field("skip", alias="agent-unavailable")
    preferred_server_retry: float = Field(30, alias="preferred-server-retry", gt=0)
    health_etcd_endpoint: str = Field("https://127.0.0.1:2379", alias="health-etcd-endpoint")
    health_apiserver_endpoint: str = Field(
        "https://127.0.0.1:6443", alias="health-apiserver-endpoint"
    )
    health_kubelet_endpoint: str = Field("https://127.0.0.1:10250", alias="health-kubelet-endpoint")
    staging_quiet: float = Field(5.0, alias="staging-quiet", ge=0)
    # Monitoring (rke2certd/daemon/metrics.py, node/node_files.py).
    metrics_address: str = Field("127.0.0.1:9347", alias="metrics-address")
    textfile_dir: Path | None = Field(None, alias="textfile-dir")
    watch_files: StrList = Field(default_factory=list, alias="watch-files")
    write_kubeconfig: Path | None = Field(None, alias="write-kubeconfig")

    @field_validator("metrics_address")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)  # ValueError says what is wrong
        return v.strip()

    @field_validator("watch_files")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        relative = [g for g in v if g and not g.startswith("/")]
        if relative:
            raise ValueError(
                f"absolute paths or globs only (e.g. /root/ci/*.kubeconfig): {relative}"
            )
        return [g for g in v if g]

    @field_validator("supervisor_bind_address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address such as 0.0.0.0 or 10.0.0.11") from None
        return v

    @field_validator("node_ip", "tls_san")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        return [x for x in v if x]

    @field_validator("service_cidr")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
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


def validate(doc: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """The validated values in JSON form (field names as keys); ConfigError lists every
    problem of `doc`, which came from `where` (a file, when there is one)."""
    try:
        model = ConfigModel.model_validate(dict(doc))
    except ValidationError as exc:
        summary = f"invalid configuration in {where}" if where else "invalid configuration"
        raise ConfigError(summary, _describe(exc)) from None
    return model.model_dump(mode="json")


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see config.example.yaml for the keys rke2certd reads)"
        problems.append(f"{key}: {msg}")
    return problems
