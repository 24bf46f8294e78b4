#!/usr/bin/env bash
# Lint, format check and the test suite.
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
python -m pytest -q -x --durations=15 "$@"
