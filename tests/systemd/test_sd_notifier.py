"""rke2certd.daemon.notify.Notifier against a NOTIFY_SOCKET made by the test (no root, no
systemd): the datagrams systemd would receive, and no-ops outside systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rke2certd.daemon.notify import Notifier


def recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(65536).decode("utf-8")
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_messages(notify_socket: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready("watching /var/lib/rancher/rke2/server/rotate-ca/incoming; next expiry 2027")
    assert recv(notify_socket) == {
        "READY": "1",
        "STATUS": "watching /var/lib/rancher/rke2/server/rotate-ca/incoming; next expiry 2027",
    }
    assert n.status("renewing kubelet\ncerts")  # a newline would start another assignment
    assert recv(notify_socket) == {"STATUS": "renewing kubelet certs"}
    assert n.watchdog()
    assert recv(notify_socket) == {"WATCHDOG": "1"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    msg = recv(notify_socket)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1" and before <= int(msg["MONOTONIC_USEC"]) <= after

    assert n.stopping()
    assert recv(notify_socket) == {"STOPPING": "1"}


def test_status_is_utf8(notify_socket: socket.socket) -> None:
    # sdnotify encodes as latin-1: a plain call would drop this message without a word
    assert Notifier().status("next expiry → 2027-01-01 (Zürich ✓)")
    assert recv(notify_socket) == {"STATUS": "next expiry → 2027-01-01 (Zürich ✓)"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rke2certd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert Notifier().ready()
        assert recv(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_outside_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    n = Notifier()
    assert not n.enabled
    assert not any(
        [
            n.ready("x"),
            n.status("x"),
            n.reloading(),
            n.stopping(),
            n.watchdog(),
        ]
    )
    assert n.watchdog_interval() is None


def test_dead_socket_is_reported_once_not_raised(
    notify_socket: socket.socket, capfd: pytest.CaptureFixture[str]
) -> None:
    n = Notifier()
    notify_socket.close()
    Path(os.environ["NOTIFY_SOCKET"]).unlink()  # systemd went away
    assert not n.watchdog()
    assert not n.watchdog()
    out, err = capfd.readouterr()  # structlog unconfigured here: its default prints to stdout
    assert (out + err).count("sd_notify_failed") == 1


def test_missing_socket_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    n = Notifier()
    assert not n.enabled and not n.ready()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("60000000", "1", None),  # inherited from the parent: not ours to ping
        ("0", None, None),
        ("nonsense", None, None),
        (None, None, None),
        ("3000000", "garbage", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if value == "self" else value)
    assert Notifier().watchdog_interval() == expected
