"""`certificate check`: one row per certificate of each file, statuses to the second, the four
output formats with upstream's field names, `-s` filtering and the exit code."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from rke2certd.commands.check import check
from rke2certd.plan.inventory import Status
from tests.conftest import FrozenClock, run_cli, write_node_config

from .conftest import LiveNode, build_live_node, fresh_dir
from .helpers import changed, load_cert, load_node, renew_at, snapshot, spec_named, specs_of

SECOND = timedelta(seconds=1)
APISERVER = spec_named("serving-kube-apiserver")
ADMIN = spec_named("client-admin")


@pytest.fixture(scope="module")
def full_node(tmp_path_factory: pytest.TempPathFactory, fast_disk: Path | None) -> LiveNode:
    """A complete node, every leaf issued now (check only reads it)."""
    return build_live_node(
        fresh_dir(fast_disk, tmp_path_factory.mktemp("check"), "check"), FrozenClock()
    )


def leaf_statuses(node: LiveNode, now: datetime) -> set[Status]:
    return {r.status for r in check(node.node, [], now).rows if r.index == 0}


def ca_statuses(node: LiveNode, now: datetime) -> set[Status]:
    return {r.status for r in check(node.node, [], now).rows if r.index > 0}


# -- rows and statuses (in-process, injected now) ---------------------------------------------


def test_one_row_per_certificate_of_each_file_chain_included(full_node: LiveNode) -> None:
    result = check(full_node.node, [], full_node.issued)
    assert result.errors == []
    per_file = Counter(r.path for r in result.rows)
    assert set(per_file) == {s.cert_path(full_node.node.layout) for s in specs_of(full_node.node)}
    assert set(per_file.values()) == {2}, "the leaf, then its CA"
    for r in result.rows:
        cert = load_cert(r.path) if r.index == 0 else None
        if cert is not None:
            assert r.not_after == cert.not_valid_after_utc
    admin = [r for r in result.rows if r.path == ADMIN.cert_path(full_node.node.layout)]
    assert [(r.subject, r.usages) for r in admin] == [
        ("system:admin", ("ClientAuth",)),
        (admin[1].issuer, ("CertSign",)),
    ]
    assert admin[1].issuer.startswith("rke2-client-ca@")


def test_statuses_at_the_edges_of_the_window(full_node: LiveNode) -> None:
    not_after = full_node.issued + timedelta(days=365)
    window_opens = not_after - timedelta(days=90)
    assert leaf_statuses(full_node, window_opens - SECOND) == {Status.OK}
    assert leaf_statuses(full_node, window_opens) == {Status.WARNING}
    assert leaf_statuses(full_node, window_opens + SECOND) == {Status.WARNING}
    assert leaf_statuses(full_node, not_after - SECOND) == {Status.WARNING}
    assert leaf_statuses(full_node, not_after) == {Status.WARNING}
    assert leaf_statuses(full_node, not_after + SECOND) == {Status.EXPIRED}
    assert ca_statuses(full_node, not_after + SECOND) == {Status.OK}, "CAs live ten years"


def test_statuses_at_the_edge_of_not_before(full_node: LiveNode) -> None:
    not_before = full_node.issued - timedelta(hours=1)
    assert leaf_statuses(full_node, not_before - SECOND) == {Status.NOT_YET_VALID}
    assert leaf_statuses(full_node, not_before) == {Status.OK}
    assert ca_statuses(full_node, not_before - SECOND) == {Status.OK}


def test_not_yet_valid_rows_show_not_before_as_their_expiry(full_node: LiveNode) -> None:
    now = full_node.issued - timedelta(hours=2)
    row = next(r for r in check(full_node.node, [], now).rows if r.index == 0)
    assert row.status is Status.NOT_YET_VALID and row.expiry == row.not_before


def test_window_follows_renew_before_days(full_node: LiveNode) -> None:
    node = load_node(full_node.cfg, renew_before_days=30)
    not_after = full_node.issued + timedelta(days=365)
    statuses = {
        offset: {
            r.status
            for r in check(node, [], not_after - timedelta(days=30) + offset).rows
            if r.index == 0
        }
        for offset in (-SECOND, timedelta(0), SECOND)
    }
    assert statuses == {
        -SECOND: {Status.OK},
        timedelta(0): {Status.WARNING},
        SECOND: {Status.WARNING},
    }


def test_services_filter_rows(full_node: LiveNode) -> None:
    rows = check(full_node.node, ["etcd"], full_node.issued).rows
    assert {r.path.name for r in rows} == {
        "client.crt",
        "server-client.crt",
        "peer-server-client.crt",
    }
    rows = check(full_node.node, ["kubelet", "admin"], full_node.issued).rows
    assert {r.path.name for r in rows} == {
        "client-kubelet.crt",
        "serving-kubelet.crt",
        "client-admin.crt",
    }


# -- the CLI: formats -------------------------------------------------------------------------


def _cli_check(node: LiveNode, *args: str) -> tuple[int, str, str]:
    res = run_cli("-c", node.cfg, "certificate", "check", *args)
    return res.returncode, res.stdout, res.stderr


UPSTREAM_JSON = ("Filename", "Subject", "Issuer", "Usages", "ExpiryTime", "ResidualTime", "Status")
UPSTREAM_YAML = tuple(k.lower() for k in UPSTREAM_JSON)
GO_DURATION = re.compile(r"^-?(\d+h)?(\d+m)?\d+(\.\d+)?s$")


def test_json_keeps_upstream_field_names_and_types(full_node: LiveNode) -> None:
    code, out, err = _cli_check(full_node, "-o", "json")
    assert code == 0, err
    started = datetime.now(UTC)
    doc = json.loads(out)
    certs = doc["Certificates"]
    assert len(certs) == 2 * len(specs_of(full_node.node))
    for c in certs:
        assert list(c)[: len(UPSTREAM_JSON)] == list(UPSTREAM_JSON)
        assert c["Status"] == "OK"
        assert isinstance(c["ResidualTime"], int)
        expiry = datetime.strptime(c["ExpiryTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        # ResidualTime is Go's time.Duration: integer nanoseconds until ExpiryTime.
        residual = timedelta(microseconds=c["ResidualTime"] / 1000)
        assert abs((expiry - started) - residual) < timedelta(seconds=30)
    admin = next(
        c for c in certs if c["Filename"] == "client-admin.crt" and c["Subject"] == "system:admin"
    )
    assert admin["Usages"] == ["ClientAuth"]
    assert admin["Issuer"].startswith("rke2-client-ca@")


def test_yaml_keeps_upstream_yaml_v2_field_names(full_node: LiveNode) -> None:
    code, out, err = _cli_check(full_node, "-o", "yaml")
    assert code == 0, err
    doc = yaml.safe_load(out)
    certs = doc["certificates"]
    assert len(certs) == 2 * len(specs_of(full_node.node))
    for c in certs:
        assert list(c)[: len(UPSTREAM_YAML)] == list(UPSTREAM_YAML)
        assert GO_DURATION.match(c["residualtime"]), c["residualtime"]
        assert c["status"] == "OK"
    serving = next(c for c in certs if c["filename"] == "serving-kube-apiserver.crt")
    assert serving["usages"] == ["ServerAuth"] and serving["subject"] == "kube-apiserver"


def test_text_has_one_line_per_certificate(full_node: LiveNode) -> None:
    """One line per certificate, then one per kubeconfig (server/cred/*.kubeconfig here)."""
    code, out, err = _cli_check(full_node, "-o", "text")
    assert code == 0, err
    lines = out.splitlines()
    kubeconfigs = [ln for ln in lines if ": kubeconfig, " in ln]
    assert len(kubeconfigs) == 6 and all(ln.startswith("OK: ") for ln in kubeconfigs)
    assert lines[-len(kubeconfigs) :] == kubeconfigs, "after the certificates"
    lines = lines[: -len(kubeconfigs)]
    assert len(lines) == 2 * len(specs_of(full_node.node))
    path = APISERVER.cert_path(full_node.node.layout)
    assert any(
        re.fullmatch(
            rf"OK: {re.escape(str(path))}: certificate kube-apiserver \(ServerAuth\) "
            r"is ok, expires at \S+Z",
            ln,
        )
        for ln in lines
    ), lines


def test_table_has_a_header_and_one_row_per_certificate(full_node: LiveNode) -> None:
    code, out, err = _cli_check(full_node, "-o", "table")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "FILENAME",
        "SUBJECT",
        "ISSUER",
        "USAGES",
        "EXPIRES",
        "RESIDUAL",
        "TIME",
        "STATUS",
    ]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2 : lines.index("")]  # then the KUBECONFIGS table
    assert lines[lines.index("") + 1] == "KUBECONFIGS"
    assert len(lines[lines.index("") + 4 :]) == 6, "server/cred/*.kubeconfig"
    assert len(rows) == 2 * len(specs_of(full_node.node))
    assert all(r.rstrip().endswith("OK") for r in rows)
    assert any(r.startswith("agent/client-kube-proxy.crt") for r in rows)
    assert any(r.startswith("tls/client-kube-proxy.crt") for r in rows)


def test_default_output_is_text(full_node: LiveNode) -> None:
    assert _cli_check(full_node)[1] == _cli_check(full_node, "-o", "text")[1]


# -- the CLI: -s filtering --------------------------------------------------------------------


def _files(out: str) -> set[str]:
    return {c["Filename"] for c in json.loads(out)["Certificates"]}


def test_cli_filters_by_one_service(full_node: LiveNode) -> None:
    code, out, _ = _cli_check(full_node, "-s", "api-server", "-o", "json")
    assert code == 0
    assert _files(out) == {"client-kube-apiserver.crt", "serving-kube-apiserver.crt"}


def test_comma_list_and_repeated_flags_select_the_same_rows(full_node: LiveNode) -> None:
    comma = _cli_check(full_node, "-s", "scheduler,etcd", "-o", "json")[1]
    repeated = _cli_check(full_node, "-s", "scheduler", "-s", "etcd", "-o", "json")[1]
    expected = {
        "client-scheduler.crt",
        "kube-scheduler.crt",
        "client.crt",
        "server-client.crt",
        "peer-server-client.crt",
    }
    assert _files(comma) == _files(repeated) == expected


def test_unknown_service_is_refused(full_node: LiveNode) -> None:
    code, out, err = _cli_check(full_node, "-s", "admin,kube-nonsense")
    assert code != 0 and out == ""
    assert "service kube-nonsense is not recognized" in err
    assert "Traceback" not in err


# -- the CLI: exit code (real clock: leaves are re-issued at chosen past/future times) --------


def test_exit_code_is_zero_when_some_certs_are_only_inside_the_window(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    APISERVER.cert_path(live_node.node.layout).unlink()
    renew_at(live_node.node, clock.at(days=-300), specs=(APISERVER,))
    code, out, _ = _cli_check(live_node, "-o", "json")
    assert code == 0
    statuses = {(c["Filename"], c["Subject"]): c["Status"] for c in json.loads(out)["Certificates"]}
    assert statuses[("serving-kube-apiserver.crt", "kube-apiserver")] == "WARNING"
    assert Counter(statuses.values())["WARNING"] == 1


def test_exit_code_is_non_zero_when_a_cert_is_expired(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    ADMIN.cert_path(live_node.node.layout).unlink()
    renew_at(live_node.node, clock.at(days=-400), specs=(ADMIN,))
    code, out, _ = _cli_check(live_node)
    assert code == 1
    [line, kubeconfig] = [ln for ln in out.splitlines() if ln.startswith("EXPIRED")]
    assert str(ADMIN.cert_path(live_node.node.layout)) in line
    # server/cred/admin.kubeconfig names that file: its line says so too
    assert kubeconfig.startswith(f"EXPIRED: {live_node.node.layout.kubeconfig('admin')}: ")
    assert "its client certificate expired at" in kubeconfig


def test_exit_code_is_non_zero_when_a_cert_is_not_yet_valid(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    ADMIN.cert_path(live_node.node.layout).unlink()
    renew_at(live_node.node, clock.at(days=2), specs=(ADMIN,))
    code, out, _ = _cli_check(live_node, "-o", "table")
    assert code == 1
    assert [ln for ln in out.splitlines() if ln.rstrip().endswith("NOT YET VALID")]


def test_unreadable_leaf_is_reported_and_fails_the_check(live_node: LiveNode) -> None:
    ADMIN.cert_path(live_node.node.layout).write_text("garbage\n")
    code, out, err = _cli_check(live_node)
    assert code == 1
    assert f"ERROR: {ADMIN.cert_path(live_node.node.layout)}: not a PEM file" in out
    assert "Traceback" not in err


def test_check_writes_nothing(full_node: LiveNode) -> None:
    before = snapshot(full_node.data, include_runtime=True)
    _cli_check(full_node, "-o", "yaml")
    assert changed(before, snapshot(full_node.data, include_runtime=True)) == set()


def test_agent_only_node_checks_its_agent_files(full_node: LiveNode, work_dir: Path) -> None:
    # An agent's data dir: only <data>/agent, copied from the full node.
    cfg, data = write_node_config(work_dir, roles=["agent"])
    shutil.copytree(full_node.data / "agent", data / "agent")
    res = run_cli("-c", cfg, "certificate", "check", "-o", "json")
    assert res.returncode == 0, res.stderr
    paths = {
        Path(c["Path"]).relative_to(data).parts[0] for c in json.loads(res.stdout)["Certificates"]
    }
    assert paths == {"agent"}
    assert _files(res.stdout) == {
        "client-kubelet.crt",
        "serving-kubelet.crt",
        "client-kube-proxy.crt",
        "client-rke2-controller.crt",
    }
