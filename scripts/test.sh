#!/usr/bin/env bash
# The whole test run on a fresh machine: system packages, Python packages, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ci-system-deps.sh
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
ruff check rke2certd tests benchmarks
ruff format --check rke2certd tests benchmarks
mypy
python3 -m pytest -q -p no:cacheprovider --durations=15 "$@"
