"""sd_notify for `rke2certd run` (over the `sdnotify` package), a no-op outside systemd.

Only the daemon's main process may notify (the unit has NotifyAccess=main). Other commands,
`rke2certd renew` above all, must not: it runs as ExecStartPre= of rke2-server/rke2-agent,
where NOTIFY_SOCKET is rke2's, and a READY=1 from it would tell systemd that RKE2 is up.

Two quirks of sdnotify 0.3 handled here: it encodes as latin-1 (a STATUS with any other
character would be dropped silently, so we send UTF-8 bytes through it), and with debug=False it
swallows every error (we ask for them, and log a failed send instead of losing it).
"""

from __future__ import annotations

import os
import time

import sdnotify

from rke2certd.log import log


class Notifier:
    def __init__(self) -> None:
        # sdnotify reads NOTIFY_SOCKET from os.environ itself, so this does too (at creation)
        self._env = dict(os.environ)
        self.socket_path = self._env.get("NOTIFY_SOCKET") or None
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failed = False
        if self.socket_path:
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                log.warning("sd_notify_unavailable", socket=self.socket_path, error=str(exc))

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram. False when not under systemd or it failed."""
        if self._notifier is None:
            return False
        text = "\n".join(a.replace("\n", " ") for a in assignments)
        try:
            # sdnotify encodes as latin-1: give it the UTF-8 bytes spelt as latin-1 characters
            self._notifier.notify(text.encode("utf-8").decode("latin-1"))
        except OSError as exc:
            if not self._failed:  # once: a dead socket would otherwise flood the log
                log.warning("sd_notify_failed", socket=self.socket_path, error=str(exc))
            self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (also ends a reload); only once the node's certificates are known good."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 to order it; 252 ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """How often to ping: half of WATCHDOG_USEC, in seconds; None when no watchdog is set
        or it is meant for another process (WATCHDOG_PID, inherited by a child)."""
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000
