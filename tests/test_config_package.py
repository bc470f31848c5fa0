"""The config package's shape: one direction of imports (no cycle, not even one hidden in a
function), each shared constant defined once, and no environment left behind by loading a
config, so the restart and health commands rke2certd spawns inherit nothing of ours."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_node_config

PACKAGE = ROOT / "rke2certd"
# Bottom up: each module may import only the modules before it (see config/__init__.py).
ORDER = ("types", "validate", "model", "sources", "cache", "load")


def _imports(path: Path) -> set[str]:
    """Every rke2certd module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("rke2certd.")}


def test_every_module_of_the_package_is_in_the_order() -> None:
    modules = {p.stem for p in (PACKAGE / "config").glob("*.py")} - {"__init__"}
    assert modules == set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_go_one_way(name: str) -> None:
    """A config module imports only modules below it, and never the package itself (its
    __init__ imports every module: that would be a cycle through the back door)."""
    below = {f"rke2certd.config.{m}" for m in ORDER[: ORDER.index(name)]}
    ours = {
        m for m in _imports(PACKAGE / "config" / f"{name}.py") if m.startswith("rke2certd.config")
    }
    assert "rke2certd.config" not in ours
    modules = {m for m in ours if m.removeprefix("rke2certd.config.") in ORDER}
    assert modules <= below, f"{name} imports {sorted(modules - below)} (not below it)"


@pytest.mark.parametrize("name", ["", *ORDER])
def test_each_module_imports_alone(name: str) -> None:
    """In a fresh interpreter, importing any one module first works (a cycle would fail for
    the module whose partner is not yet initialised)."""
    module = f"rke2certd.config.{name}" if name else "rke2certd.config"
    res = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr


def test_public_names() -> None:
    import rke2certd.config as config

    for name in config.__all__:
        assert getattr(config, name) is not None
    assert {"Config", "Role", "load_config"} <= set(config.__all__)


# --- one home for each shared constant ------------------------------------------------------

LOG_FORMATS = {"auto", "journald", "json", "console"}


def _literals(path: Path) -> list[tuple[int, object]]:
    """(line, value) of every constant and of every all-string tuple/list/Literal[...]."""
    out: list[tuple[int, object]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Tuple | ast.List):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if items and len(items) == len(node.elts) and all(isinstance(i, str) for i in items):
                out.append((node.lineno, frozenset(items)))
    return out


def test_shared_constants_are_defined_once() -> None:
    """The supervisor port, RKE2's data dir and the log formats appear as literals only in
    rke2certd/constants.py; every other module imports them from there."""
    wanted = {
        "supervisor port": lambda v: v == 9346 and not isinstance(v, bool),
        "data dir": lambda v: v == "/var/lib/rancher/rke2",
        "log formats": lambda v: v == frozenset(LOG_FORMATS),
    }
    homes: dict[str, list[str]] = {k: [] for k in wanted}
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, value in _literals(path):
            for what, match in wanted.items():
                if match(value):
                    homes[what].append(f"{path.relative_to(ROOT)}:{line}")
    for what, where in homes.items():
        assert len(where) == 1 and where[0].startswith("rke2certd/constants.py:"), (what, where)


def test_the_constants_are_what_the_rest_uses() -> None:
    from typing import get_args

    from rke2certd.config.validate import ConfigModel
    from rke2certd.constants import DEFAULT_DATA_DIR, LOG_FORMATS, LOG_LEVELS, SUPERVISOR_PORT

    fields = ConfigModel.model_fields
    assert fields["data_dir"].default == DEFAULT_DATA_DIR
    assert fields["supervisor_port"].default == SUPERVISOR_PORT
    assert get_args(fields["log_format"].annotation) == LOG_FORMATS
    assert get_args(fields["log_level"].annotation) == LOG_LEVELS


# --- no environment left behind ----------------------------------------------------------------

PROBE = """
import json, os, sys, threading
from pathlib import Path

before = {k for k in os.environ if k.startswith("PYDANTIC")}
import rke2certd.cli
from rke2certd.config import Config, load_config
from rke2certd.rollout.job import Gate, RestartJob

cfg = load_config(Path(sys.argv[1]))
Config.from_mapping({"data-dir": "/nonexistent"})
assert "pydantic" in sys.modules, "the load did not validate: the test proves nothing"
added = sorted({k for k in os.environ if k.startswith("PYDANTIC")} - before)

# The rollout runner gives the restart and health commands os.environ (less systemd's
# private variables, plus its RKE2CERTD_* facts): run them the way it does.
out = Path(sys.argv[2])
dump = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
done = threading.Event()
job = RestartJob(
    [sys.executable, "-c", dump, str(out / "restart.json")],
    Gate([sys.executable, "-c", dump, str(out / "health.json")]),
    dict(os.environ),
    restart_timeout=60, health_timeout=60, wake=done.set,
)
job.start()
done.wait()
print(json.dumps({"added": added, "ok": job.result.ok, "message": job.result.message}))
"""


def test_loading_a_config_leaves_no_pydantic_variable(tmp_path: Path) -> None:
    """PYDANTIC_DISABLE_PLUGINS used to be set at import: every restart and health command
    rke2certd spawned inherited it. Neither the process nor its commands see it now."""
    cfg, _ = write_node_config(tmp_path)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYDANTIC") and k != "PYTHONPATH"
    }
    env.update(PYTHONPATH=str(ROOT), RKE2CERTD_CACHE_DIR="")  # no cache: the load validates
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(cfg), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == {"added": [], "ok": True, "message": "healthy"}
    for step in ("restart", "health"):
        child = json.loads((tmp_path / f"{step}.json").read_text())
        assert [k for k in child if k.startswith("PYDANTIC")] == [], step
