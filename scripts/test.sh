#!/usr/bin/env bash
# The test command: set-up, lint (ruff), format check, types (mypy), then every test (unit and
# integration) on 2 workers. Extra arguments go to pytest (e.g. -k awq, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== ruff"; ruff check anyquant tests benchmarks
ruff format --check anyquant tests benchmarks
echo "== mypy"; mypy
echo "== pytest"; python -m pytest -q -n 2 "$@"
