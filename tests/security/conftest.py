"""The daemon tests' fixtures (a node per test, the session's captured logs): the threat tests
run the same real daemon, and their logs are grepped for secrets like the others'."""

from tests.daemon.conftest import captured_logs_dir, node

__all__ = ["captured_logs_dir", "node"]
