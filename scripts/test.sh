#!/usr/bin/env bash
# Set up (once) and run the checks: ruff lint and format, then the test suite. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev
ruff check .
ruff format --check .
python -m pytest "$@"
