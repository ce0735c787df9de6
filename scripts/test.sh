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
# Two pytest workers on two cores: one torch thread each. With torch's default (one thread per core)
# the workers oversubscribe the CPU and tiny parallel kernels (SDPA) stall for milliseconds.
export OMP_NUM_THREADS=1
echo "== pytest"; python -m pytest -q -n 2 "$@"
