#!/usr/bin/env bash
# The whole test run on a fresh machine: system packages, Python packages, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ci-system-deps.sh
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
ruff check rke2certd tests benchmarks
ruff format --check rke2certd tests benchmarks
mypy
# Every tier, with the run's fixed random seed (printed at the end). Arguments go to pytest:
# -m "not slow" for the developer loop, --seed random to look for new fault-test failures.
python3 -m pytest -q -p no:cacheprovider --durations=15 "$@"
