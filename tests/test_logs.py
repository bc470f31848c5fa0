"""rke2certd.log's set-up (output.py, redact.py, journald.py): redaction in every format, JSON
lines, the journald wire format, and the journald sink against a real systemd-journald (read
back with journalctl)."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rke2certd.constants import LogFormat
from rke2certd.errors import ConfigError
from rke2certd.log import journald, output, redact
from tests.harness.journald import Journald
from tests.harness.journald import missing_requirements as journald_missing

PASSWORD = "s3cr3t-Pa55word-zz"
TOKEN = "K10" + "0f" * 32 + "::server:" + PASSWORD
NODE_TOKEN = "K10" + "a1" * 32 + "::node:agent-pw-4242"


def _pems() -> dict[str, str]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    enc = serialization.Encoding.PEM
    fmt = serialization.PrivateFormat
    none = serialization.NoEncryption()
    return {
        "sec1": ec_key.private_bytes(enc, fmt.TraditionalOpenSSL, none).decode(),
        "pkcs1": rsa_key.private_bytes(enc, fmt.TraditionalOpenSSL, none).decode(),
        "pkcs8": ec_key.private_bytes(enc, fmt.PKCS8, none).decode(),
        "encrypted": rsa_key.private_bytes(
            enc, fmt.PKCS8, serialization.BestAvailableEncryption(b"pw")
        ).decode(),
        "openssh": ed_key.private_bytes(enc, fmt.OpenSSH, none).decode(),
    }


PEMS = _pems()


def secrets_in(text: str | bytes) -> list[str]:
    """Every secret of this module that shows up in `text` (key bodies, passwords, tokens)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found = [s for s in (PASSWORD, "agent-pw-4242", "0f" * 32 + "::") if s in text]
    for name, pem in PEMS.items():
        body = pem.splitlines()[1]  # the first base64 line of the key
        if body in text or body in text.replace("\\n", "\n"):
            found.append(f"{name} key body")
    if "BEGIN" in text and "PRIVATE KEY-----" in text:
        found.append("PEM private key header")
    return found


def log_every_kind_of_secret() -> None:
    log = structlog.get_logger("rke2certd")
    log.info(
        "cert_renewed",
        cert_path="/var/lib/rancher/rke2/server/tls/kube-scheduler/kube-scheduler.crt",
        cert_service="kube-scheduler",
        cert_serial="1a2b",
        reason="expiring",
        token=TOKEN,
        password=PASSWORD,
        db_passwd=PASSWORD,
        key_pem=PEMS["sec1"],
        private_key=PEMS["pkcs8"].encode(),
        client_secret=PASSWORD,
        ca_key=PEMS["pkcs1"],
        detail=f"rotate-ca with {TOKEN} and key\n{PEMS['encrypted']}",
        nested={"auth": {"password": PASSWORD}, "list": [NODE_TOKEN, PEMS["openssh"]]},
    )
    log.warning(f"event text carries {NODE_TOKEN} and {PEMS['pkcs8']}")
    try:
        raise ValueError(f"bad key material: {PEMS['sec1']} token {TOKEN}")
    except ValueError:
        log.exception("renew_failed", cert_service="kubelet")
    logging.getLogger("some.library").warning("library says token=%s", TOKEN)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    output.reset()
    logging.getLogger().setLevel(logging.WARNING)


# --- redaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "agent_token",
        "password",
        "db_passwd",
        "key_pem",
        "secret",
        "client_secret",
        "private_key",
        "privkey",
        "ca_key",
        "key",
        "passphrase",
        "Authorization",
        "api_key",
    ],
)
def test_secret_names(name: str) -> None:
    assert redact.is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "cert_path",
        "cert_service",
        "cert_serial",
        "key_path",
        "token_file",
        "reason",
        "staged_set",
        "ca_generation",
        "key_type",
        "keys_changed",
        "event",
    ],
)
def test_harmless_names(name: str) -> None:
    assert not redact.is_secret_name(name)


@pytest.mark.parametrize("kind", sorted(PEMS))
def test_every_pem_private_key_kind_is_masked(kind: str) -> None:
    text = f"before\n{PEMS[kind]}after"
    masked = redact.redact_text(text)
    assert secrets_in(masked) == []
    assert masked.startswith("before\n[REDACTED PRIVATE KEY]")
    assert masked.endswith("after")


def test_cut_short_pem_key_is_masked_to_the_end() -> None:
    pem = PEMS["pkcs1"]
    assert secrets_in(redact.redact_text("x " + pem[: len(pem) // 2])) == []


def test_certificates_and_bare_hashes_stay_readable() -> None:
    cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    assert redact.redact_text(cert) == cert
    ca_hash = "K10" + "0f" * 32  # a hash without credentials is no secret
    assert redact.redact_text(ca_hash) == ca_hash


def test_join_tokens_masked_in_text() -> None:
    masked = redact.redact_text(f"token {TOKEN}, agent {NODE_TOKEN}")
    assert secrets_in(masked) == []
    assert masked.count("K10[REDACTED TOKEN]") == 2


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_in_stream_formats(fmt: LogFormat, capfd: pytest.CaptureFixture[str]) -> None:
    output.configure(fmt, "debug")
    log_every_kind_of_secret()
    out, err = capfd.readouterr()
    assert out == ""  # logs never go to stdout: it is for command output
    assert "cert_renewed" in err and "renew_failed" in err and "library says" in err
    assert secrets_in(err) == []


# --- JSON lines ----------------------------------------------------------------------------------


def test_json_lines(capfd: pytest.CaptureFixture[str]) -> None:
    output.configure("json", "info")
    log = structlog.get_logger("rke2certd")
    log.debug("not_shown")
    log.info(
        "cert_renewed", cert_path=Path("/x/kubelet.crt"), cert_service="kubelet", ca_generation=2
    )
    log.error("staged_set_rejected", staged_set="set-1", reason=["bad chain", "key mismatch"])
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert [e["event"] for e in lines] == ["cert_renewed", "staged_set_rejected"]
    first, second = lines
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert first["cert_path"] == "/x/kubelet.crt" and first["ca_generation"] == 2
    assert second["level"] == "error" and second["reason"] == ["bad chain", "key mismatch"]


def test_levels_and_errors(capfd: pytest.CaptureFixture[str]) -> None:
    output.configure("json", "WARNING")
    structlog.get_logger("rke2certd").info("quiet")
    structlog.get_logger("rke2certd").warning("loud")
    assert [json.loads(x)["event"] for x in capfd.readouterr().err.splitlines()] == ["loud"]
    with pytest.raises(ConfigError, match="log-level 'chatty'"):
        output.configure("json", "chatty")
    with pytest.raises(ConfigError, match="log-format"):
        output.configure("xml", "info")  # type: ignore[arg-type]


# --- choosing the sink ---------------------------------------------------------------------------


def test_auto_picks_journald_when_stderr_is_the_journal_stream() -> None:
    st = os.fstat(2)
    assert output.detect_format({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) == "journald"
    # inherited from a parent whose stderr went to the journal, but ours goes elsewhere now
    assert output.detect_format({"JOURNAL_STREAM": f"{st.st_dev}:1"}) != "journald"
    assert output.detect_format({"JOURNAL_STREAM": "garbage"}) != "journald"


def test_auto_under_systemd_with_journal_socket(tmp_path: Path) -> None:
    sock = tmp_path / "socket"
    env = {"INVOCATION_ID": "0123456789abcdef0123456789abcdef"}
    plain = "console" if os.isatty(2) else "json"
    assert output.detect_format(env, journal_socket=str(sock)) == plain  # no journald there
    sock.touch()
    assert output.detect_format(env, journal_socket=str(sock)) == "journald"
    assert output.detect_format({}, journal_socket=str(sock)) == plain


# --- journald wire format (a socket of the test's own; no root) ----------------------------------


def parse_native(data: bytes) -> list[tuple[str, str]]:
    """Decode journald's native protocol (the spec, independently of rke2certd's encoder)."""
    fields, i = [], 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields.append((name.decode("ascii"), value.decode("utf-8")))
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "socket"))
    sock.settimeout(5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> list[tuple[str, str]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
    if fds:  # too big for a datagram: the entry comes as a sealed memfd
        with os.fdopen(fds[0], "rb") as f:
            f.seek(0)  # the offset is shared with the sender's fd, which wrote it
            data = f.read()
    return parse_native(data)


def test_journal_wire_format(journal_socket: socket.socket) -> None:
    output.configure("journald", "debug", journal_socket=journal_socket.getsockname())
    log = structlog.get_logger("rke2certd")
    log.warning(
        "cert_renewed",
        cert_path="/var/lib/rancher/rke2/agent/client-kubelet.crt",
        cert_service=["kubelet", "kube-proxy"],
        detail="line one\nline two",
        **{"9lives": 1, "_private": "x", "weird-name.here": "y", "message": "m", "flag": True},
    )
    fields = receive(journal_socket)
    names = [n for n, _ in fields]
    get = dict(fields)
    assert names[:3] == ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"]
    assert get["PRIORITY"] == "4" and get["SYSLOG_IDENTIFIER"] == "rke2certd"
    assert "\n" not in get["MESSAGE"]
    assert get["MESSAGE"].startswith("cert_renewed cert_path=/var/lib/rancher/rke2/agent/")
    assert "cert_service=kubelet,kube-proxy" in get["MESSAGE"]
    assert [v for n, v in fields if n == "CERT_SERVICE"] == ["kubelet", "kube-proxy"]
    assert get["DETAIL"] == "line one\nline two"  # binary (length-prefixed) form
    assert get["EVENT"] == "cert_renewed" and get["FLAG"] == "true"
    assert get["F_9LIVES"] == "1" and get["PRIVATE"] == "x" and get["WEIRD_NAME_HERE"] == "y"
    assert get["EVENT_MESSAGE"] == "m"  # never overrides the entry's own MESSAGE
    assert all(n.isupper() or "_" in n for n in names)

    priorities = {}
    for level in ("debug", "info", "error", "critical"):
        getattr(log, level)("lvl")
        priorities[level] = dict(receive(journal_socket))["PRIORITY"]
    assert priorities == {"debug": "7", "info": "6", "error": "3", "critical": "2"}


def test_journal_no_secrets_on_the_wire(journal_socket: socket.socket) -> None:
    output.configure("journald", "debug", journal_socket=journal_socket.getsockname())
    log_every_kind_of_secret()
    for _ in range(4):
        fields = receive(journal_socket)
        assert secrets_in("\n".join(f"{n}={v}" for n, v in fields)) == []
        if dict(fields)["EVENT"] == "renew_failed":
            assert "Traceback" in dict(fields)["EXCEPTION"]
            assert "(ValueError: bad key material" in dict(fields)["MESSAGE"]


def test_journal_big_entry_goes_by_memfd(
    journal_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journald, "MAX_JOURNAL_VALUE", 8 * 1024 * 1024)
    output.configure("journald", "info", journal_socket=journal_socket.getsockname())
    sndbuf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).getsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF
    )
    big = "x" * (sndbuf + 100_000)  # cannot fit one datagram
    structlog.get_logger("rke2certd").info("big", blob=big)
    assert dict(receive(journal_socket))["BLOB"] == big


def test_journal_values_are_capped(journal_socket: socket.socket) -> None:
    output.configure("journald", "info", journal_socket=journal_socket.getsockname())
    structlog.get_logger("rke2certd").info("huge", blob="y" * (journald.MAX_JOURNAL_VALUE * 2))
    blob = dict(receive(journal_socket))["BLOB"]
    assert blob.endswith("...[truncated]") and len(blob) < journald.MAX_JOURNAL_VALUE + 100


def test_journal_unreachable_falls_back_to_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output.configure("journald", "info", journal_socket=str(tmp_path / "nothing-here"))
    structlog.get_logger("rke2certd").info("first", token=TOKEN)
    structlog.get_logger("rke2certd").info("second")
    err = capfd.readouterr().err.splitlines()
    assert "unreachable" in err[0]
    assert err[1:] == ["first token=[REDACTED]", "second"]


# --- the real systemd-journald -------------------------------------------------------------------


@pytest.mark.systemd
def test_real_journald_fields_filter_and_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = journald_missing()
    if reason:
        pytest.skip(f"standalone journald: {reason}")
    monkeypatch.setattr(journald, "MAX_JOURNAL_VALUE", 1024 * 1024)
    with Journald(tmp_path / "jd") as jd:
        output.configure("journald", "info", journal_socket=str(jd.socket))
        log = structlog.get_logger("rke2certd")
        log.info(
            "cert_renewed",
            cert_path="/var/lib/rancher/rke2/agent/serving-kubelet.crt",
            cert_service="kubelet",
            cert_serial="7f3a",
            cert_not_after="2027-11-28T00:00:00+00:00",
            reason="inside renewal window",
            ca_generation=3,
            staged_set="2026-rotation",
        )
        log.info("cert_renewed", cert_path="/x/kube-proxy.crt", cert_service="kube-proxy")
        log.warning("restart_needed", cert_service=["kubelet", "kube-apiserver"], detail="a\nb")
        structlog.get_logger("rke2certd").info("blob", blob="z" * 600_000)  # > SO_SNDBUF: memfd
        log_every_kind_of_secret()

        kubelet = jd.entries("CERT_SERVICE=kubelet", expect=3)
        by_event = {e["EVENT"]: e for e in kubelet}
        assert sorted(by_event) == ["cert_renewed", "renew_failed", "restart_needed"]
        renewed = by_event["cert_renewed"]
        assert renewed["PRIORITY"] == "6" and renewed["SYSLOG_IDENTIFIER"] == "rke2certd"
        assert renewed["_TRANSPORT"] == "journal" and renewed["_PID"] == str(os.getpid())
        assert renewed["CERT_PATH"] == "/var/lib/rancher/rke2/agent/serving-kubelet.crt"
        assert renewed["CERT_SERIAL"] == "7f3a" and renewed["CA_GENERATION"] == "3"
        assert renewed["CERT_NOT_AFTER"] == "2027-11-28T00:00:00+00:00"
        assert renewed["REASON"] == "inside renewal window"
        assert renewed["STAGED_SET"] == "2026-rotation"
        assert renewed["MESSAGE"].startswith("cert_renewed cert_path=/var/lib/rancher/rke2/")
        restart = by_event["restart_needed"]
        assert restart["PRIORITY"] == "4" and restart["DETAIL"] == "a\nb"
        assert sorted(restart["CERT_SERVICE"]) == ["kube-apiserver", "kubelet"]
        assert len(jd.entries("CERT_SERVICE=kube-proxy")) == 1
        assert jd.entries("EVENT=blob")[0]["BLOB"] == "z" * 600_000
        assert jd.entries("EVENT=renew_failed")[0]["PRIORITY"] == "3"

        everything = jd.export()
        assert b"cert_renewed" in everything and b"library says" in everything
        assert secrets_in(everything) == []
