"""The validated-config cache (rke2certd/config/cache.py): a hit gives what a fresh load gives,
without yaml or pydantic; any changed input is read and validated again; a cache file we could
not have written is ignored; no cache dir, no cache, no noise.

Loads run in a subprocess (a real `load_config` in a fresh interpreter), which reports the
Config and whether it imported pydantic or yaml, i.e. whether it validated."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rke2certd.config import Config, load_config
from rke2certd.config.validate import ConfigModel
from rke2certd.errors import ConfigError
from tests.conftest import ROOT, run_cli, write_node_config

TOKEN = "s3cret-join-token-7f2c"
PROBE = """
import dataclasses, json, sys
from pathlib import Path
from rke2certd.config import load_config
from rke2certd.errors import ConfigError
try:
    cfg = load_config(Path(sys.argv[1]) if sys.argv[1] else None, json.loads(sys.argv[2]))
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sources"}
print(json.dumps({
    "values": values,
    "sources": [str(p) for p in cfg.sources],
    "validated": "pydantic" in sys.modules or "yaml" in sys.modules,
}, default=str))
"""


def load(
    cfg: Path | None,
    runtime: Path | str,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(cfg or ""), json.dumps(overrides or {})],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(ROOT),
            "RKE2CERTD_CACHE_DIR": str(runtime),
            **(env or {}),
        },
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    """A cache dir that does not exist yet (its parent does): the first load makes it."""
    (tmp_path / "run").mkdir()
    return tmp_path / "run" / "rke2certd"


@pytest.fixture
def rke2(tmp_path: Path) -> Path:
    """RKE2's config with two drop-ins."""
    d = tmp_path / "etc-rke2"
    (d / "config.yaml.d").mkdir(parents=True)
    (d / "config.yaml").write_text(f"node-name: from-rke2\ntls-san: [a.example]\ntoken: {TOKEN}\n")
    (d / "config.yaml.d" / "10-san.yaml").write_text("tls-san+: [b.example]\n")
    (d / "config.yaml.d" / "20-ip.yaml").write_text("node-ip: 192.0.2.7\n")
    return d / "config.yaml"


@pytest.fixture
def ours(tmp_path: Path, rke2: Path) -> Path:
    cfg, _ = write_node_config(tmp_path, node_name=None, node_ip=None, tls_san=None)
    doc = yaml.safe_load(cfg.read_text())
    doc["rke2-config"] = str(rke2)
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def cache_files(runtime: Path) -> list[Path]:
    return sorted(runtime.glob("config-*.json"))


def test_a_hit_is_the_fresh_load_without_validation(ours: Path, runtime: Path) -> None:
    uncached = load(ours, "")
    first = load(ours, runtime)
    second = load(ours, runtime)
    assert uncached["validated"] and first["validated"] and not second["validated"]
    assert uncached["values"] == first["values"] == second["values"]
    assert uncached["sources"] == second["sources"]
    assert second["values"]["tls_san"] == ["a.example", "b.example"]
    assert second["values"]["node_ip"] == ["192.0.2.7"]


def test_sources_are_the_files_read_lowest_precedence_first(ours: Path, rke2: Path) -> None:
    cfg = load_config(ours)
    dropins = rke2.parent / "config.yaml.d"
    assert cfg.sources == (rke2, dropins / "10-san.yaml", dropins / "20-ip.yaml", ours)
    assert load_config(ours) == cfg  # the cached load (this process's cache dir)
    assert load_config(ours).sources == cfg.sources


@pytest.mark.parametrize(
    "edit",
    ["ours", "rke2", "dropin", "add-dropin", "remove-dropin", "overrides", "env"],
)
def test_every_changed_input_is_read_again(
    edit: str, ours: Path, rke2: Path, runtime: Path, tmp_path: Path
) -> None:
    dropins = rke2.parent / "config.yaml.d"
    load(ours, runtime)
    assert not load(ours, runtime)["validated"]
    overrides: dict[str, Any] = {}
    env: dict[str, str] = {}
    path: Path | None = ours
    match edit:
        case "ours":
            ours.write_text(ours.read_text() + "renew-before-days: 30\n")
            check = ("renew_before_days", 30)
        case "rke2":
            rke2.write_text(rke2.read_text().replace("from-rke2", "edited"))
            check = ("node_name", "edited")
        case "dropin":
            (dropins / "20-ip.yaml").write_text("node-ip: 192.0.2.8\n")
            check = ("node_ip", ["192.0.2.8"])
        case "add-dropin":
            (dropins / "30-more.yaml").write_text("tls-san+: [c.example]\n")
            check = ("tls_san", ["a.example", "b.example", "c.example"])
        case "remove-dropin":
            (dropins / "10-san.yaml").unlink()
            check = ("tls_san", ["a.example"])
        case "overrides":
            overrides = {"log-level": "debug"}
            check = ("log_level", "debug")
        case _:
            other = tmp_path / "other.yaml"
            other.write_text(ours.read_text() + "cluster-domain: example.test\n")
            path, env = None, {"RKE2CERTD_CONFIG": str(other)}
            check = ("cluster_domain", "example.test")
    got = load(path, runtime, overrides, env)
    assert got["validated"], "a changed input must be validated again"
    assert got["values"][check[0]] == check[1]
    assert not load(path, runtime, overrides, env)["validated"], "and cached again"


def test_a_now_bad_value_reports_every_problem(ours: Path, rke2: Path, runtime: Path) -> None:
    load(ours, runtime)
    ours.write_text(ours.read_text() + "renew-before-days: 0\nbogus-key: 1\n")
    (rke2.parent / "config.yaml.d" / "20-ip.yaml").write_text("service-cidr: not-a-cidr\n")
    err = load(ours, runtime)["error"]
    assert f"invalid configuration in {ours}" in err
    for problem in ("renew-before-days", "bogus-key: unknown key", "'not-a-cidr' is not a CIDR"):
        assert problem in err
    ours.write_text(ours.read_text().replace("bogus-key: 1\n", ""))
    assert "renew-before-days" in load(ours, runtime)["error"], "an error is never cached"


def test_cache_file_and_dir_modes(ours: Path, runtime: Path) -> None:
    load(ours, runtime)
    assert runtime.stat().st_mode & 0o777 == 0o700
    [entry] = cache_files(runtime)
    assert entry.stat().st_mode & 0o777 == 0o600
    assert TOKEN in entry.read_text(), "the token is cached: hence 0600 in a 0700 dir"


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "wrong-shape", "missing-value", "bad-role", "empty"]
)
def test_a_damaged_cache_is_ignored_and_rewritten(damage: str, ours: Path, runtime: Path) -> None:
    good = load(ours, runtime)
    [entry] = cache_files(runtime)
    text = entry.read_text()
    entry.write_text(
        {
            "garbage": "\x00not json",
            "truncated": text[: len(text) // 2],
            "wrong-shape": json.dumps({**json.loads(text), "files": 3}),
            "missing-value": json.dumps({**json.loads(text), "values": {"node_name": "x"}}),
            "bad-role": text.replace('"etcd"', '"bogus"'),
            "empty": "",
        }[damage]
    )
    got = load(ours, runtime)
    assert got["validated"] and got["values"] == good["values"]
    assert entry.read_text() == text, "rewritten"
    assert not load(ours, runtime)["validated"]


@pytest.mark.parametrize("problem", ["foreign-owner", "group-readable", "symlink", "open-dir"])
def test_a_cache_we_could_not_have_written_is_ignored(
    problem: str, ours: Path, runtime: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0 and problem == "foreign-owner":
        pytest.skip("chown needs root")
    good = load(ours, runtime)
    [entry] = cache_files(runtime)
    # A forged entry: what a hit would return if the file were trusted.
    forged = json.loads(entry.read_text())
    forged["values"]["node_name"] = "forged"
    entry.write_text(json.dumps(forged))
    match problem:
        case "foreign-owner":
            os.chown(entry, 65534, 65534)
        case "group-readable":
            entry.chmod(0o640)
        case "symlink":
            elsewhere = tmp_path / "forged.json"
            entry.rename(elsewhere)
            entry.symlink_to(elsewhere)
        case _:
            runtime.chmod(0o777)
    got = load(ours, runtime)
    assert got["validated"] and got["values"] == good["values"]


@pytest.mark.parametrize("where", ["no-parent", "not-a-dir", "foreign-dir"])
def test_no_usable_cache_dir_means_no_cache_and_no_noise(
    where: str, ours: Path, tmp_path: Path
) -> None:
    runtime = {
        "no-parent": tmp_path / "missing" / "deeper" / "rke2certd",
        "not-a-dir": tmp_path / "a-file",
        "foreign-dir": tmp_path / "foreign",
    }[where]
    if where == "not-a-dir":
        runtime.write_text("")
    if where == "foreign-dir":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        runtime.mkdir(mode=0o755)
        os.chown(runtime, 65534, 65534)
    first, second = load(ours, runtime), load(ours, runtime)  # `load` asserts empty stderr
    assert first["validated"] and second["validated"]
    assert first["values"] == second["values"]
    assert not (tmp_path / "missing").exists()
    if where == "foreign-dir":
        assert list(runtime.iterdir()) == []


def test_an_empty_cache_dir_setting_turns_the_cache_off(ours: Path, tmp_path: Path) -> None:
    assert load(ours, "")["validated"] and load(ours, "")["validated"]


def test_the_cli_never_logs_the_token(ours: Path, runtime: Path) -> None:
    env = {"RKE2CERTD_CACHE_DIR": str(runtime)}
    for _ in range(2):  # a miss, then a hit
        res = run_cli("-c", ours, "--debug", "renew", "-o", "json", env=env)
        assert res.returncode == 0, res.stderr
        assert TOKEN not in res.stdout + res.stderr
    assert TOKEN not in repr(load_config(ours))


def test_from_mapping_validates_and_reports_every_problem() -> None:
    cfg = Config.from_mapping({"node-name": "n1", "roles": ["agent", "etcd"]})
    assert cfg.node == "n1" and cfg.is_server and cfg.has_agent and cfg.sources == ()
    with pytest.raises(ConfigError) as err:
        Config.from_mapping({"supervisor-port": 0, "roles": [], "nope": 1})
    assert err.value.summary == "invalid configuration"
    assert len(err.value.problems) == 3, err.value.problems


def test_the_dataclass_and_the_model_have_the_same_fields() -> None:
    fields = {f.name for f in dataclasses.fields(Config)} - {"sources"}
    assert fields == set(ConfigModel.model_fields)
