"""The journald sink: events as native journal entries, with every field searchable.

It speaks the native protocol on the datagram socket directly (no python-systemd): each field
is `NAME=value\\n`, or `NAME\\n<u64le length><value>\\n` when the value has a newline. An entry
too big for one datagram is passed as a sealed memfd (SCM_RIGHTS), as sd_journal_send does. A
single value is capped at MAX_JOURNAL_VALUE bytes (with a marker) so that one runaway field
cannot make an entry journald drops.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from structlog.typing import EventDict, WrappedLogger

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "rke2certd"
MAX_JOURNAL_VALUE = 64 * 1024

# syslog priorities (sd-daemon.h), keyed by structlog's level names.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


def journal_field_name(name: str) -> str:
    """`cert_path` -> `CERT_PATH`; only [A-Z0-9_], no leading `_` or digit, at most 64 chars."""
    out = re.sub(r"[^A-Z0-9_]", "_", name.upper()).lstrip("_")
    if not out:
        out = "FIELD"
    elif out[0].isdigit():
        out = "F_" + out
    return out[:64]


def _journal_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def _encode_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if len(data) > MAX_JOURNAL_VALUE:
        data = data[:MAX_JOURNAL_VALUE] + b"...[truncated]"
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def _one_line(value: str, limit: int = 200) -> str:
    text = " ".join(value.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MESSAGE_SKIP = frozenset({"event", "level", "timestamp", "exception", "stack"})
_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID"})


def _exception_summary(text: str) -> str:
    """`ValueError: message` of a formatted traceback: what follows its last frame (`  File`
    line and its 4-space-indented code/caret lines), so a message spanning lines stays whole."""
    lines = text.strip().splitlines()
    i = max((n for n, line in enumerate(lines) if line.startswith('  File "')), default=-1) + 1
    while 0 < i < len(lines) and lines[i].startswith("    "):
        i += 1
    return _one_line(" ".join(lines[i:]) or lines[-1])


def journal_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The journal entry for one (already redacted) event: MESSAGE, PRIORITY, identifier and
    every field upper-cased. A list value becomes the field repeated once per item, so that
    `journalctl CERT_SERVICE=kubelet` matches an event about several services."""
    level = str(event_dict.get("level", "info"))
    parts = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key in _MESSAGE_SKIP or value is None:
            continue
        if isinstance(value, list | tuple):
            text = ",".join(_journal_text(v) for v in value)
        else:
            text = _journal_text(value)
        text = _one_line(text)
        parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
    message = " ".join(p for p in parts if p)
    exc = event_dict.get("exception")
    if isinstance(exc, str) and exc.strip():
        message += f" ({_exception_summary(exc)})"

    fields = [
        ("MESSAGE", _one_line(message, 2000)),
        ("PRIORITY", str(_PRIORITY.get(level, 6))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
    ]
    for key, value in event_dict.items():
        if key in ("level", "timestamp") or value is None:
            continue
        name = journal_field_name(key)
        if name in _OWN_FIELDS:
            name = "EVENT_" + name  # an event field never overrides the entry's own MESSAGE...
        items = value if isinstance(value, list | tuple) else [value]
        fields.extend((name, _journal_text(v)) for v in items)
    return fields


def encode_journal_entry(fields: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(_encode_field(name, value) for name, value in fields)


class JournalLogger:
    """Sends entries to journald's native socket. When journald cannot be reached, the entry's
    MESSAGE goes to stderr instead (under systemd stderr is the journal's stream anyway)."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # a wedged journald must not block the daemon forever (the watchdog would fire)
            sock.settimeout(5.0)
            self._sock = sock
        return self._sock

    def send(self, payload: bytes) -> None:
        with self._lock:
            sock = self._socket()
            try:
                sock.sendto(payload, self.socket_path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(sock, payload)

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        # Too big for a datagram: hand journald a sealed memfd holding the entry (journal-native).
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            sock.sendmsg([], [rights], 0, self.socket_path)
        finally:
            os.close(fd)

    def msg(self, fields: list[tuple[str, str]]) -> None:
        try:
            self.send(encode_journal_entry(fields))
        except OSError as exc:
            message = next((v for k, v in fields if k == "MESSAGE"), "")
            with self._lock:
                if not self._warned:
                    self._warned = True
                    sys.stderr.write(
                        f"rke2certd: journald at {self.socket_path} unreachable "
                        f"({exc.strerror or exc}); logging to stderr\n"
                    )
                sys.stderr.write(message + "\n")
                sys.stderr.flush()

    debug = info = warning = warn = error = err = critical = fatal = exception = log = msg

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def render_journal(
    _logger: WrappedLogger, _name: str, event_dict: EventDict
) -> tuple[tuple[list[tuple[str, str]]], dict[str, Any]]:
    """Final processor for the journald sink: hands JournalLogger.msg the entry's fields."""
    return (journal_fields(event_dict),), {}
