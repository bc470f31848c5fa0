"""`Config`: the validated configuration, a plain frozen dataclass that the commands only read.

The rules that make one (keys, defaults, checks) are `validate.ConfigModel`; a Config is built
from its output, fresh or from the cache, by `from_values`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rke2certd.config.types import DEFAULT_RKE2_CONFIG_DIR, LogFormat, LogLevel, Role

if TYPE_CHECKING:
    from rke2certd.plan.rollout import Availability


@dataclass(frozen=True, kw_only=True)
class Config:
    """The validated configuration. Defaults and rules live in `validate.ConfigModel` (the one
    place); build a Config with `load_config` or `Config.from_mapping`."""

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
        # Imported here for its cost (pydantic, ~60 ms), not for a cycle: validate imports
        # nothing of model.py.
        from rke2certd.config.validate import validate

        return from_values(validate(doc, where), ())

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
        # Imported here because the startup hook never asks (a lower layer; no cycle).
        from datetime import timedelta

        from rke2certd.plan.rollout import Availability, Unavailable

        grace = timedelta(seconds=self.agent_unavailable_grace)
        return Availability(grace, Unavailable(self.agent_unavailable))

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


def from_values(values: Mapping[str, Any], sources: tuple[Path, ...]) -> Config:
    """A Config from validated values in their JSON form (ConfigModel.model_dump(mode="json")).
    A fresh load and a cache hit both go through here, so they cannot differ."""
    kw = dict(values)
    for name in _PATH_FIELDS:
        if kw[name] is not None:
            kw[name] = Path(kw[name])
    kw["roles"] = [Role(r) for r in kw["roles"]]
    return Config(**kw, sources=sources)
