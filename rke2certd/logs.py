"""Logging: structlog set-up, secret redaction, and the sinks (journald, JSON lines, console).

Use `structlog.get_logger("rke2certd")` and log events with lowercase snake-case fields
(`log.info("cert_renewed", cert_path=..., cert_service="kubelet")`). `configure()` decides where
they go; logs always go to stderr or the journal, never stdout (stdout is command output).

The journald sink speaks the native protocol on the datagram socket directly (no python-systemd):
each field is `NAME=value\\n`, or `NAME\\n<u64le length><value>\\n` when the value has a newline.
An entry too big for one datagram is passed as a sealed memfd (SCM_RIGHTS), as sd_journal_send
does. A single value is capped at MAX_JOURNAL_VALUE bytes (with a marker) so that one runaway field
cannot make an entry journald drops.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import PurePath
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rke2certd.errors import ConfigError

LogFormat = Literal["auto", "journald", "json", "console"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "rke2certd"
MAX_JOURNAL_VALUE = 64 * 1024
REDACTED = "[REDACTED]"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

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

# --- redaction -----------------------------------------------------------------------------------

# A field whose name says "secret" is masked whatever its value. Names that only point at a
# secret (a path, a file name, a hash, a count...) stay readable: their values are still scanned.
_SECRET_NAME = re.compile(
    r"token|passw|passphrase|secret|private_?key|privkey|key_?pem|pem_?key|credential|"
    r"authorization|bearer|api_?key|^key$|_key$|^keys$|_keys$",
    re.IGNORECASE,
)
_HARMLESS_SUFFIX = re.compile(
    r"_(path|paths|file|files|dir|name|names|hash|type|id|count|usage|bits|algorithm|size|"
    r"fingerprint|valid|present|changed|expired)$",
    re.IGNORECASE,
)
# Any PEM private key block (PKCS#8, PKCS#1, SEC1, encrypted, OpenSSH), also when cut short.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
# Join tokens, docs/RKE2-COMPATIBILITY.md §7: K10<64 hex>::<user>:<password>.
_JOIN_TOKEN = re.compile(r"K10[0-9a-fA-F]{64}::[^\s:]+:\S+")
_PEM_MASK = "[REDACTED PRIVATE KEY]"
_TOKEN_MASK = "K10[REDACTED TOKEN]"  # noqa: S105 - the mask, not a secret


def is_secret_name(name: str) -> bool:
    """True when a field called `name` must never be shown."""
    return bool(_SECRET_NAME.search(name)) and not _HARMLESS_SUFFIX.search(name)


def redact_text(text: str) -> str:
    """Mask PEM private keys and join tokens anywhere in `text`. A bare password (the short token
    form) cannot be recognised in free text: it is masked only as a secret-named field."""
    if "PRIVATE KEY-----" in text:
        text = _PEM_KEY.sub(_PEM_MASK, text)
    if "K10" in text:
        text = _JOIN_TOKEN.sub(_TOKEN_MASK, text)
    return text


def _redact_value(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        masked = redact_text(text)
        return masked if masked != text else value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if depth >= 8:
        return redact_text(str(value))
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if is_secret_name(str(k)) else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    # Anything else is rendered through str() by every sink: render it here so it is scanned.
    return redact_text(str(value))


def redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-named fields and secret-looking text in every value."""
    for key in list(event_dict):
        value = event_dict[key]
        if is_secret_name(key) and value is not None and not isinstance(value, bool):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


# --- sinks ---------------------------------------------------------------------------------------


class _StderrLogger:
    """Writes one line per event to the *current* sys.stderr (so redirection and tests work)."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            stream: TextIO = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = err = critical = fatal = exception = log = msg


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


def _event_first(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """JSON lines read better with timestamp, level and event leading."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


def render_journal(
    _logger: WrappedLogger, _name: str, event_dict: EventDict
) -> tuple[tuple[list[tuple[str, str]]], dict[str, Any]]:
    """Final processor for the journald sink: hands JournalLogger.msg the entry's fields."""
    return (journal_fields(event_dict),), {}


# --- detection and set-up ------------------------------------------------------------------------


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """systemd's rule: JOURNAL_STREAM=<dev>:<inode> names the stream connected to journald;
    it is ours only if fd 2 still is that stream (a child may have redirected it)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(2)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


def detect_format(
    environ: Mapping[str, str] | None = None, journal_socket: str = JOURNAL_SOCKET
) -> Literal["journald", "json", "console"]:
    """What `auto` means here: journald under systemd, console text on a TTY, else JSON lines."""
    env = os.environ if environ is None else environ
    if stderr_is_journal(env):
        return "journald"
    if env.get("INVOCATION_ID") and os.path.exists(journal_socket):
        return "journald"
    try:
        if os.isatty(2):
            return "console"
    except OSError:
        pass
    return "json"


class _StdlibBridge(logging.Handler):
    """Routes records of libraries (watchdog, etcd clients...) through the same processors,
    so they reach the same sink and get the same redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger("rke2certd")
            log.log(record.levelno, record.getMessage(), logger=record.name)
        except Exception:  # a log call must never raise into the caller
            self.handleError(record)


_bridge: _StdlibBridge | None = None
_journal: JournalLogger | None = None


def parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ConfigError(
            "invalid log level",
            [f"log-level {level!r}: use one of debug, info, warning, error, critical"],
        ) from None


def configure(fmt: LogFormat, level: str, *, journal_socket: str = JOURNAL_SOCKET) -> None:
    """Set up structlog (and route the stdlib `logging` of libraries into it).

    `journal_socket` exists for tests that run their own journald.
    """
    global _bridge, _journal
    min_level = parse_level(level)
    if fmt not in ("auto", "journald", "json", "console"):
        raise ConfigError(
            "invalid log format", [f"log-format {fmt!r}: use auto, journald, json or console"]
        )
    chosen = detect_format(journal_socket=journal_socket) if fmt == "auto" else fmt

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if chosen != "journald":  # journald stamps entries itself
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(redact)  # last before rendering: it must see exception text too

    if _journal is not None:
        _journal.close()
        _journal = None
    logger_factory: Any
    if chosen == "journald":
        journal = _journal = JournalLogger(journal_socket)
        processors.append(render_journal)

        def logger_factory(*_args: Any) -> JournalLogger:
            return journal
    else:
        if chosen == "json":
            processors.append(_event_first)
            processors.append(structlog.processors.JSONRenderer(default=str, sort_keys=False))
        else:
            colors = os.isatty(2) and "NO_COLOR" not in os.environ
            processors.append(structlog.dev.ConsoleRenderer(colors=colors))

        def logger_factory(*_args: Any) -> _StderrLogger:
            return _StderrLogger()

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=logger_factory,
        context_class=dict,
        # not cached: configure() may run again (tests, SIGHUP changing log-level)
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    if _bridge is not None:
        root.removeHandler(_bridge)
    _bridge = _StdlibBridge()
    root.addHandler(_bridge)
    # libraries' DEBUG (watchdog logs every inotify event) would drown rke2certd's own debug
    root.setLevel(max(min_level, logging.INFO))


def reset() -> None:
    """Undo configure(): structlog's defaults, no stdlib bridge (for tests)."""
    global _bridge, _journal
    structlog.reset_defaults()
    if _bridge is not None:
        logging.getLogger().removeHandler(_bridge)
        _bridge = None
    if _journal is not None:
        _journal.close()
        _journal = None


def bind_context(**fields: Any) -> None:
    """Fields added to every event of this thread/task (e.g. staged_set while applying a set)."""
    structlog.contextvars.bind_contextvars(**fields)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()
