"""Roles, node kind and the RKE2 config's location come from RKE2 by default; rke2certd's own
keys override; bad values say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from rke2certd.config import Role, load_config
from rke2certd.errors import ConfigError

ALL = [Role.ETCD, Role.CONTROL_PLANE, Role.AGENT]


def _node(tmp_path: Path, rke2: dict[str, Any] | None, **ours: Any) -> Path:
    if rke2 is not None:
        (tmp_path / "rke2").mkdir(exist_ok=True)
        (tmp_path / "rke2" / "config.yaml").write_text(yaml.safe_dump(rke2))
        ours.setdefault("rke2-config", str(tmp_path / "rke2" / "config.yaml"))
    cfg = tmp_path / "ours.yaml"
    cfg.write_text(yaml.safe_dump({"data-dir": str(tmp_path / "data"), **ours}))
    return cfg


def _units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> Path:
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    for name in names:
        (d / f"{name}.service").write_text("[Service]\n")
    monkeypatch.setenv("RKE2CERTD_UNIT_DIRS", f"{tmp_path / 'nowhere'}:{d}")
    return d


@pytest.mark.parametrize(
    ("flags", "roles"),
    [
        ({}, ALL),
        ({"disable-etcd": True}, [Role.CONTROL_PLANE, Role.AGENT]),
        (
            {
                "disable-apiserver": True,
                "disable-controller-manager": True,
                "disable-scheduler": "true",
            },
            [Role.ETCD, Role.AGENT],
        ),
        ({"disable-apiserver": True}, ALL),  # the scheduler and controller-manager remain
        ({"disable-etcd": "false"}, ALL),
    ],
)
def test_server_roles_from_rke2_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: dict[str, Any], roles: list[Role]
) -> None:
    _units(tmp_path, monkeypatch, "rke2-server")
    cfg = load_config(_node(tmp_path, flags))
    assert cfg.roles == roles
    assert cfg.rke2_config == tmp_path / "rke2" / "config.yaml"


def test_node_kind_from_the_installed_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    units = _units(tmp_path, monkeypatch, "rke2-agent")
    path = _node(tmp_path, {"server": "https://10.0.0.1:9345", "disable-etcd": True})
    cfg = load_config(path)
    assert cfg.roles == [Role.AGENT]
    # a unit file is a fact, not configuration: the token rewrite edits `sources` only
    assert cfg.sources == (tmp_path / "rke2" / "config.yaml", path)
    assert load_config(path).sources == cfg.sources, "the cached load too"
    (units / "rke2-server.service").write_text("[Service]\n")  # both: a server (it runs both)
    assert load_config(path).roles == [Role.CONTROL_PLANE, Role.AGENT], "the cache saw the unit"
    (units / "rke2-agent.service").unlink()
    (units / "rke2-server.service").unlink()
    assert load_config(path).roles == [Role.CONTROL_PLANE, Role.AGENT], "no unit: a server"


def test_our_roles_override_rke2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _units(tmp_path, monkeypatch, "rke2-agent")
    cfg = load_config(_node(tmp_path, {"disable-etcd": True}, roles=["etcd"]))
    assert cfg.roles == [Role.ETCD]


def test_every_component_disabled_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _units(tmp_path, monkeypatch, "rke2-server")
    flags = {
        k: True
        for k in (
            "disable-etcd",
            "disable-apiserver",
            "disable-controller-manager",
            "disable-scheduler",
        )
    }
    with pytest.raises(ConfigError, match="disables etcd and every control-plane component"):
        load_config(_node(tmp_path, flags))


def test_rke2_config_default_location_and_opt_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rke2 = tmp_path / "etc-rancher" / "config.yaml"
    monkeypatch.setenv("RKE2CERTD_RKE2_CONFIG", str(rke2))
    path = _node(tmp_path, None)
    assert load_config(path).rke2_config is None, "no file there: a standalone node"
    rke2.parent.mkdir()
    rke2.write_text("node-name: from-rke2\ndisable-etcd: true\n")
    cfg = load_config(path)
    assert (cfg.rke2_config, cfg.node_name) == (rke2, "from-rke2")
    assert cfg.roles == [Role.CONTROL_PLANE, Role.AGENT]
    opted_out = load_config(_node(tmp_path, None, **{"rke2-config": ""}))
    assert opted_out.rke2_config is None and opted_out.node_name is None
    assert opted_out.roles == ALL


def test_role_keys_are_not_ours(tmp_path: Path) -> None:
    """RKE2's disable-* keys are read from RKE2's config only; in ours they are unknown."""
    with pytest.raises(ConfigError, match="disable-etcd: unknown key"):
        load_config(_node(tmp_path, None, **{"disable-etcd": True}))


def test_the_enabled_unit_decides_when_both_are_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RKE2's tarball installs both unit files; `systemctl enable rke2-agent` makes an agent."""
    units = _units(tmp_path, monkeypatch, "rke2-server", "rke2-agent")
    path = _node(tmp_path, {"server": "https://10.0.0.1:9345"})
    assert load_config(path).roles == ALL
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "rke2-agent.service").symlink_to(units / "rke2-agent.service")
    assert load_config(path).roles == [Role.AGENT]
    (wants / "rke2-server.service").symlink_to(units / "rke2-server.service")
    assert load_config(path).roles == ALL
