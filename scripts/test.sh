#!/usr/bin/env bash
# Set up (idempotent) and run every check: lint, types, tests. Fails when any of them fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check archalign corpus tests examples benchmarks
python -m mypy
python -m pytest -q "$@"
