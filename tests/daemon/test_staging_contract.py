"""The watched staging dir, end to end through a running `rke2certd run` (real inotify, real
`rotate-ca` checks, the embedded SQLite datastore): what is applied, when, and what is refused.

The contract: a set is applied when it was renamed in whole and nothing changed in it
for the quiet period, or when its READY marker exists; a directory made in place and still being
written is never applied without the marker; sets go one at a time in name order; sets staged
while the daemon was down are handled at start; an unsafe staging dir is refused loudly; a
symlink inside a set gets it rejected."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest

from tests.daemon.support import DaemonNode, age_tree

FILED = re.compile(r"^(?P<name>.+)-\d{8}T\d{6}Z(\.\d+)?$")


def started(node: DaemonNode) -> None:
    """The node's CAs and certificates exist (so that sets can be staged from them)."""
    node.cli("renew")


def filed_names(node: DaemonNode) -> set[str]:
    return {
        p.name
        for bucket in (".applied", ".rejected")
        if (node.incoming / bucket).is_dir()
        for p in (node.incoming / bucket).iterdir()
    }


def staging_events(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if str(e.get("event", "")).startswith(("staged_set_", "rotate_ca"))]


def test_a_set_renamed_in_is_applied_after_the_quiet_period(node: DaemonNode) -> None:
    node.write_config(staging_quiet=1.5)  # long enough to tell "after the quiet period" apart
    with node.daemon() as d:
        d.notify.expect("READY")
        ca_before = (node.data / "server/tls/server-ca.crt").read_bytes()
        src = node.stage_rotation("rotation-1")
        renamed_at = time.monotonic()
        os.rename(src, node.incoming / "rotation-1")
        path, result = node.wait_result("rotation-1")
        took = time.monotonic() - renamed_at
        # not before the quiet period (a lower bound only: a slow machine files it later)
        assert took >= 1.5, f"filed {took:.2f}s after the rename (quiet 1.5 s)"
        assert path.parent.parent.name == ".applied"
        assert FILED.match(path.parent.name)["name"] == "rotation-1"  # type: ignore[index]
        assert result["status"] == "applied" and result["force"] is False
        assert result["reasons"] == []
        assert len(result["changed"]) == 11  # 5 CA certs and keys, service.key
        assert result["caGeneration"]["old"] != result["caGeneration"]["new"]
        assert result["tokensChanged"] is True
        assert "applied" in (path.parent / "result.txt").read_text()
        assert not (node.incoming / "rotation-1").exists()
        # the node took the new CAs (the daemon renews right after a set is applied)
        d.wait_event("restart_needed", reason="staged set rotation-1 applied")
        assert (node.data / "server/tls/server-ca.crt").read_bytes() != ca_before
        applied = d.wait_event("staged_set_applied", staged_set="rotation-1")
        assert applied["ca_generation"] == result["caGeneration"]["new"]
        assert applied["cert_path"] == str(path.parent)
        assert d.events("ca_rotated")
        assert d.stop() == 0
        assert d.stray_lines() == []  # JSON lines only: no raw warning of a library


def test_a_set_made_in_place_is_never_applied_until_its_ready_marker(node: DaemonNode) -> None:
    """`mkdir` in the staging dir, files copied in with pauses longer than the quiet period,
    one file written in two halves: nothing happens; the READY marker makes it apply at once."""
    started(node)
    src = node.stage_rotation("source")
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    with node.daemon() as d:
        d.notify.expect("READY")
        target = node.incoming / "in-place"
        (target / "tls" / "etcd").mkdir(parents=True)
        half = len(files) // 2
        for rel in files[:half]:  # at once, as `mkdir d && cp … d/` would
            shutil.copy(src / rel, target / rel)
        time.sleep(node.quiet * 3)
        last = files[-1]
        for rel in files[half:-1]:
            shutil.copy(src / rel, target / rel)
        data = (src / last).read_bytes()
        with (target / last).open("wb") as f:  # a file still being written
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(node.quiet * 3)
            f.write(data[len(data) // 2 :])
        time.sleep(node.quiet * 3)  # complete now, and quiet: still waiting for READY
        assert filed_names(node) == set()
        assert (target / last).read_bytes() == data
        assert staging_events(d.events()) == []

        (target / "READY").touch()
        # at once: the next timed wake (the rescan) is an hour away, beyond the wait's deadline
        _path, result = node.wait_result("in-place")
        assert result["status"] == "applied", result
        assert d.stop() == 0


def test_two_sets_are_handled_one_at_a_time_in_name_order(node: DaemonNode) -> None:
    """Both sets cross-sign the same current CAs. Staged together, `set-a` (first in name order)
    is applied; `set-b` is then checked against the CAs set-a installed, which it does not
    extend, so it is refused: it was not checked alongside set-a."""
    started(node)
    set_a, set_b = node.stage_rotation("set-a"), node.stage_rotation("set-b")
    with node.daemon() as d:
        d.notify.expect("READY")
        os.rename(set_b, node.incoming / "set-b")  # renamed in the other order
        os.rename(set_a, node.incoming / "set-a")
        _, a = node.wait_result("set-a")
        _, b = node.wait_result("set-b")
        assert a["status"] == "applied", a
        assert b["status"] == "rejected", b
        assert a["time"] <= b["time"]
        events = staging_events(d.events())
        about = [str(e.get("staged_set", "")).rsplit("/", 1)[-1] for e in events]
        # every event about set-a comes before the first one about set-b
        assert about.index("set-b") > max(i for i, n in enumerate(about) if n == "set-a"), about
        assert d.stop() == 0
        assert d.stray_lines() == []


def test_a_set_staged_while_the_daemon_was_down_is_handled_at_start(node: DaemonNode) -> None:
    started(node)
    src = node.stage_rotation("while-down")
    node.incoming.mkdir(mode=0o700)
    os.rename(src, node.incoming / "while-down")
    age_tree(node.incoming / "while-down", 60)  # staged a minute ago
    with node.daemon() as d:
        d.notify.expect("READY")
        # handled during start-up, before READY
        assert [p.parent.parent.name for p in node.results("while-down")] == [".applied"]
        d.wait_event("ready")  # logged just after READY is sent
        names = [e["event"] for e in d.events()]
        assert names.index("staged_set_applied") < names.index("ready")
        assert d.stop() == 0


@pytest.mark.parametrize(
    ("unsafe", "problem"),
    [
        (lambda p: os.chown(p, 65534, 65534), "owned by uid 65534"),
        (lambda p: p.chmod(0o777), "writable by group or others (mode 777)"),
    ],
    ids=["owner-65534", "mode-0777"],
)
def test_an_unsafe_staging_dir_is_refused_loudly_and_nothing_is_applied(
    node: DaemonNode, unsafe: object, problem: str
) -> None:
    started(node)
    src = node.stage_rotation("waiting")
    node.incoming.mkdir(mode=0o700)
    os.rename(src, node.incoming / "waiting")
    age_tree(node.incoming / "waiting", 60)
    unsafe(node.incoming)  # type: ignore[operator]
    with node.daemon() as d:
        ready = d.notify.expect("READY")
        assert "REFUSING the staging dir" in ready.fields["STATUS"]
        refused = d.wait_event("staging_refused")
        assert refused["level"] == "error"
        assert problem in refused["reason"] and str(node.incoming) in refused["reason"]
        assert "chmod 0700" in refused["reason"]  # says how to fix it
        time.sleep(node.quiet * 5)
        assert (node.incoming / "waiting" / "tls").is_dir()
        assert filed_names(node) == set()
        assert staging_events(d.events()) == []
        assert not d.events("staging_watched")

        # Fixed and reloaded, the same set goes through: the refusal was all that held it.
        os.chown(node.incoming, 0, 0)
        node.incoming.chmod(0o700)
        d.signal(signal.SIGHUP)
        d.notify.expect("READY")
        _, result = node.wait_result("waiting")
        assert result["status"] == "applied"
        assert d.stop() == 0


def test_a_staging_dir_made_unsafe_while_running_is_refused_until_fixed(node: DaemonNode) -> None:
    started(node)
    src = node.stage_rotation("meanwhile")
    with node.daemon() as d:
        d.notify.expect("READY")
        node.incoming.chmod(0o777)  # someone "fixes" a permission problem the wrong way
        os.rename(src, node.incoming / "meanwhile")
        refused = d.wait_event("staging_refused")
        assert "mode 777" in refused["reason"] and refused["level"] == "error"
        time.sleep(node.quiet * 5)
        assert (node.incoming / "meanwhile" / "tls").is_dir()
        assert filed_names(node) == set() and staging_events(d.events()) == []
        assert len(d.events("staging_refused")) == 1  # said once, not at every wake-up

        node.incoming.chmod(0o700)  # fixed: the watcher sees the change and goes on
        _, result = node.wait_result("meanwhile")
        assert result["status"] == "applied"
        assert d.wait_event("staging_watched", reason="safe again")
        assert d.stop() == 0


def test_a_symlink_inside_a_set_gets_it_rejected_with_that_reason(node: DaemonNode) -> None:
    started(node)
    ca_before = (node.data / "server/tls/server-ca.crt").read_bytes()
    src = node.stage_rotation("linked")
    (src / "tls/server-ca.key").unlink()
    # a link to a real CA key: applied, it would pull in a file that is not in the set
    (src / "tls/server-ca.key").symlink_to(node.data / "server/tls/client-ca.key")
    with node.daemon() as d:
        d.notify.expect("READY")
        os.rename(src, node.incoming / "linked")
        path, result = node.wait_result("linked")
        assert path.parent.parent.name == ".rejected"
        assert result["status"] == "rejected"
        assert any("symbolic link" in r and "server-ca.key" in r for r in result["reasons"]), result
        assert "symbolic link" in (path.parent / "result.txt").read_text()
        rejected = d.wait_event("staged_set_rejected", staged_set="linked")
        assert rejected["level"] == "error" and "symbolic link" in rejected["reason"]
        assert (path.parent / "set/tls/server-ca.key").is_symlink()  # filed as found, in set/
        assert (node.data / "server/tls/server-ca.crt").read_bytes() == ca_before
        assert d.stop() == 0


def test_a_symlink_staged_as_a_set_is_rejected_not_followed(node: DaemonNode) -> None:
    started(node)
    real = node.stage_rotation("real")
    with node.daemon() as d:
        d.notify.expect("READY")
        link = node.staged_dir("link")
        link.symlink_to(real)
        os.rename(link, node.incoming / "link")
        path, result = node.wait_result("link")
        assert path.parent.parent.name == ".rejected"
        assert "not a directory" in result["reasons"][0]
        assert (real / "tls/server-ca.crt").is_file()  # the target was neither used nor moved
        assert json.loads(path.read_text())["status"] == "rejected"
        assert not d.events("ca_rotated")
        assert d.stop() == 0
