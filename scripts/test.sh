#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, type-check, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mypy
.venv/bin/ruff check src tests bench tools
.venv/bin/pytest -q "$@"
