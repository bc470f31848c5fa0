"""Where events go: structlog's set-up for the chosen format (journald, JSON lines, console
text) and level, secret redaction on every path, and the stdlib `logging` of libraries routed
through the same processors. Logs go to stderr or the journal, never stdout (stdout is command
output). Modules log with `from rke2certd.log import log`, which calls `configure` at the
first event.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rke2certd.constants import LOG_FORMATS, LogFormat, Sink
from rke2certd.errors import ConfigError
from rke2certd.log.journald import JOURNAL_SOCKET, JournalLogger, render_journal
from rke2certd.log.redact import redact

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _StderrLogger:
    """Writes one line per event to the *current* sys.stderr (so redirection and tests work)."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            stream: TextIO = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = err = critical = fatal = exception = log = msg


def _event_first(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """JSON lines read better with timestamp, level and event leading."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


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
) -> Sink:
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
    if fmt not in LOG_FORMATS:
        raise ConfigError(
            "invalid log format", [f"log-format {fmt!r}: use {', '.join(LOG_FORMATS)}"]
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
