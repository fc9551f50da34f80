#!/usr/bin/env bash
# Runs the whole suite. Services the tests need (Postgres, Redis) are started here as throwaway
# instances and stopped on exit; see scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check merge_engine app worker migrations tests bench
exec .venv/bin/python -m pytest "$@"
