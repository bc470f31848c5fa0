"""Where configuration comes from: our YAML file, RKE2's config and its `config.yaml.d`
drop-ins (shared keys only, merged RKE2's way), and RKE2's systemd units (which of
rke2-server / rke2-agent this node runs). Every file read is recorded in `Inputs`, the key of
the validated-config cache.

Environment (read when asked, never at import): RKE2CERTD_RKE2_CONFIG replaces the default
RKE2 config path ("" = none; tests, a node with RKE2 elsewhere); RKE2CERTD_UNIT_DIRS (a `:`
list) replaces the systemd unit dirs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rke2certd.config.types import DEFAULT_RKE2_CONFIG_DIR, Role, str_list
from rke2certd.errors import ConfigError

# RKE2's own config: used when it exists, unless `rke2-config` says otherwise ("" = none).
DEFAULT_RKE2_CONFIG = DEFAULT_RKE2_CONFIG_DIR / "config.yaml"
RKE2_CONFIG_ENV = "RKE2CERTD_RKE2_CONFIG"
# Where systemd unit files are installed.
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


@dataclass
class Inputs:
    """What a load read: each file with the SHA-256 of its bytes (None: it does not exist),
    and each drop-in dir with its listing (None: not a dir). The cache key of cache.py."""

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


def parse_yaml(data: bytes | None, path: Path, what: str) -> dict[str, Any]:
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
    return parse_yaml(read_input(path, what, inputs), path, what)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """RKE2's merge rule: a later file overrides; `key+:` appends to a list."""
    out = dict(base)
    for key, value in extra.items():
        if key.endswith("+"):
            k = key[:-1]
            old = str_list(out.get(k, []))
            new = str_list(value)
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
        merged = merge(merged, _read_yaml(f, "RKE2 config drop-in", inputs))
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
