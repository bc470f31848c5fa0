"""`certificate check` with its facts cache (rke2certd/node/cert_facts.py): output identical to
the uncached path in every format and at the window edges, a changed file parsed again, a
damaged or foreign cache ignored, and a warm check that imports no X.509 or pydantic."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.commands.check import RENDERERS, check
from tests.conftest import run_cli

from .conftest import LiveNode
from .helpers import spec_named

SECOND = timedelta(seconds=1)
ADMIN = spec_named("client-admin")
SCHEDULER = spec_named("client-scheduler")


def facts_file(runtime: Path) -> Path:
    [path] = runtime.glob("certs-*.json")
    return path


def render_all(node: LiveNode, now: datetime) -> dict[str, str]:
    result = check(node.node, [], now)
    return {fmt: render(result) for fmt, render in RENDERERS.items()}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setenv("RKE2CERTD_CACHE_DIR", str(d))
    return d


def edge_times(node: LiveNode) -> list[datetime]:
    not_after = node.issued + timedelta(days=365)
    opens = not_after - timedelta(days=90)
    not_before = node.issued - timedelta(hours=1)
    return [
        not_before - SECOND,
        not_before,
        opens - SECOND,
        opens,
        not_after,
        not_after + SECOND,
    ]


def test_cached_output_is_byte_identical_in_every_format_and_at_the_edges(
    live_node: LiveNode, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for now in edge_times(live_node):
        monkeypatch.setenv("RKE2CERTD_CACHE_DIR", "")
        uncached = render_all(live_node, now)
        monkeypatch.setenv("RKE2CERTD_CACHE_DIR", str(runtime))
        cold = render_all(live_node, now)  # parses (the first time), writes the cache
        warm = render_all(live_node, now)
        assert uncached == cold == warm, now
    assert facts_file(runtime).stat().st_mode & 0o777 == 0o600
    assert runtime.stat().st_mode & 0o777 == 0o700


def test_a_changed_file_is_parsed_again(live_node: LiveNode, runtime: Path) -> None:
    layout = live_node.node.layout
    before = check(live_node.node, [], live_node.issued)
    admin = next(r for r in before.rows if r.path == ADMIN.cert_path(layout))
    assert admin.subject == "system:admin"
    ADMIN.cert_path(layout).write_bytes(SCHEDULER.cert_path(layout).read_bytes())
    after = check(live_node.node, [], live_node.issued)
    admin = next(r for r in after.rows if r.path == ADMIN.cert_path(layout))
    assert admin.subject == "system:kube-scheduler"
    ADMIN.cert_path(layout).write_text("garbage\n")
    errors = check(live_node.node, [], live_node.issued).errors
    assert len(errors) == 1 and errors[0].startswith(f"{ADMIN.cert_path(layout)}: not a PEM")


@pytest.mark.parametrize("problem", ["garbage", "forged-bad-types", "foreign-owner", "open"])
def test_a_damaged_or_untrusted_cache_is_ignored(
    problem: str, live_node: LiveNode, runtime: Path
) -> None:
    now = live_node.issued
    expected = render_all(live_node, now)
    path = facts_file(runtime)
    doc = json.loads(path.read_text())
    match problem:
        case "garbage":
            path.write_text("{not json")
        case "forged-bad-types":
            doc["facts"] = {k: [[1, 2, 3, 4, 5, 6]] for k in doc["facts"]}
            path.write_text(json.dumps(doc))
        case "foreign-owner" | "open":
            # A forged subject: shown only if the file were trusted.
            doc["facts"] = {k: [["forged", *f[0][1:]]] for k, f in doc["facts"].items()}
            path.write_text(json.dumps(doc))
            if problem == "open":
                path.chmod(0o644)
            elif os.geteuid() == 0:
                os.chown(path, 65534, 65534)
            else:
                pytest.skip("chown needs root")
    assert render_all(live_node, now) == expected
    assert render_all(live_node, now) == expected  # and after the rewrite


def test_a_warm_check_process_imports_no_x509_yaml_or_pydantic(live_node: LiveNode) -> None:
    # The CLI's renew records the facts (live_node was built in-process, without the cache).
    assert run_cli("-c", live_node.cfg, "renew").returncode == 0
    res = run_cli("-c", live_node.cfg, "certificate", "check", "-o", "json")  # config cached
    assert res.returncode == 0, res.stderr
    env = {"PYTHONPROFILEIMPORTTIME": "1"}  # -X importtime
    res = run_cli("-c", live_node.cfg, "certificate", "check", "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()}
    heavy = {m for m in imported if m.split(".")[0] in {"cryptography", "pydantic", "yaml"}}
    assert heavy == set()
    assert json.loads(res.stdout)["Certificates"]


def test_exit_codes_are_those_of_the_uncached_check(live_node: LiveNode) -> None:
    ADMIN.cert_path(live_node.node.layout).write_text("garbage\n")
    for _ in range(2):  # cold, then warm
        res = run_cli("-c", live_node.cfg, "certificate", "check")
        assert res.returncode == 1 and "ERROR:" in res.stdout, res.stderr
