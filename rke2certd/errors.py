"""The one error root. Every error the operator sees derives from Rke2certdError.

Messages are written for an operator: what is wrong, where, and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable


class Rke2certdError(Exception):
    """Root of every error rke2certd raises on purpose. The CLI prints it and exits `exit_code`."""

    exit_code = 1


class ValidationError(Rke2certdError):
    """Several problems found at once; all are reported together."""

    def __init__(self, summary: str, problems: Iterable[str]) -> None:
        self.summary = summary
        self.problems = list(problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{summary}:\n{body}" if self.problems else summary)


# EX_CONFIG of sysexits.h, kept for configuration errors alone: the unit's
# RestartPreventExitStatus= names it, so a config that cannot load ends in a failed unit that
# says why, instead of a restart every few seconds that never succeeds.
EX_CONFIG = 78


class ConfigError(ValidationError):
    """The configuration file or command line is invalid."""

    exit_code = EX_CONFIG


class DatastoreFilesMissing(ConfigError):
    """The datastore's TLS files are not there (yet: RKE2 writes its etcd client files at its
    start); the startup hook may go on without the datastore."""


class UsageError(Rke2certdError):
    """A command was called with arguments it cannot accept."""

    exit_code = 2


class PKIError(Rke2certdError):
    """A certificate or key on disk is unusable (garbage PEM, wrong type, mismatch)."""


class StorageError(Rke2certdError):
    """A file could not be read or written safely (permissions, full disk...)."""


class LockTimeout(Rke2certdError):
    """Another rke2certd process holds the node lock for too long."""


class DatastoreError(Rke2certdError):
    """The datastore is unreachable or returned something unusable."""


class TokenError(Rke2certdError):
    """A join token is malformed, or does not match the data it protects."""
