"""A pytest plugin, required by tests/test_no_secrets_in_logs.py: that grep of the captured logs
runs after every test that writes them, whatever order the paths were given in."""

from __future__ import annotations

import pytest

SECRETS_TEST = "test_no_secrets_in_logs.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [i for i in items if i.path.name == SECRETS_TEST]
    if last:
        items[:] = [i for i in items if i.path.name != SECRETS_TEST] + last
