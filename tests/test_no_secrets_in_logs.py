"""No private key, join token or password in any log the test suite captured.

The daemon tests (tests/daemon/, tests/systemd/test_daemon_systemd.py, and the stand-in units
of tests/systemd/test_systemd_package.py) file every stderr (and stdout) of `rke2certd run` and
of the CLI, and the journals of their containers, under the session's captured-logs dir, and
record every token password they gave rke2certd or it made. This test runs after them (the
plugin below moves it last, whatever order the paths were given in) and greps all of it.
"""

from __future__ import annotations

import re

import pytest

from tests.daemon.support import CapturedLogs

pytest_plugins = ["tests.daemon.log_order"]

PEM_KEY = re.compile(rb"PRIVATE KEY-----")
JOIN_TOKEN = re.compile(rb"K10[0-9a-f]{64}::")
# Tests whose logs end up in the captured-logs dir.
PRODUCERS = ("tests/daemon/", "tests/systemd/test_daemon_systemd.py")


def leaks(data: bytes, passwords: list[str]) -> list[str]:
    """What in `data` must never be in a log."""
    found = [m.group().decode() for p in (PEM_KEY, JOIN_TOKEN) for m in p.finditer(data)]
    found += [f"password {pw[:6]}…" for pw in passwords if pw.encode() in data]
    return found


def test_the_grep_finds_what_it_looks_for() -> None:
    """The patterns are not vacuous: each kind of secret is caught, redacted text is not."""
    pw = "daemon-test-0123456789abcdef01234567"
    token = "K10" + "ab12" * 16 + "::server:" + pw
    assert leaks(b"-----BEGIN EC PRIVATE KEY-----\nMHcC...", []) == ["PRIVATE KEY-----"]
    assert leaks(token.encode(), []) == ["K10" + "ab12" * 16 + "::"]
    assert leaks(f'{{"reason": "bad {pw}"}}'.encode(), [pw]) == ["password daemon…"]
    redacted = b'{"token": "[REDACTED]", "x": "K10[REDACTED TOKEN]", "k": "[REDACTED PRIVATE KEY]"}'
    assert leaks(redacted, [pw]) == []


def test_no_private_key_token_or_password_in_any_captured_log(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ran = [i for i in request.session.items if any(p in i.nodeid for p in PRODUCERS)]
    if not ran:
        pytest.skip("no test that captures daemon logs was collected in this session")
    logs = CapturedLogs.for_session(tmp_path_factory)
    files = sorted(p for p in logs.dir.rglob("*") if p.is_file())
    passwords = logs.passwords()
    scanned = {p: p.read_bytes() for p in files}
    total = sum(len(d) for d in scanned.values())
    # Not vacuous: the daemon tests' logs are here, with their events, and had secrets to leak.
    assert passwords, "no password was recorded: the fixtures did not run"
    assert len(files) >= min(len(ran), 5), f"only {len(files)} log files in {logs.dir}"
    assert total >= 20_000, f"only {total} bytes of log in {logs.dir}"
    assert sum(d.count(b"cert_renewed") for d in scanned.values()) >= 10

    found = {str(p.relative_to(logs.dir)): leaks(d, passwords) for p, d in scanned.items()}
    found = {name: hits for name, hits in found.items() if hits}
    assert not found, f"secrets in captured logs under {logs.dir}: {found}"
    print(
        f"scanned {len(files)} files, {total / 1024:.0f} KiB, for PEM keys, join tokens and "
        f"{len(passwords)} passwords: clean"
    )
