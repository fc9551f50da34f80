#!/usr/bin/env bash
# Runs the whole suite. Services the tests need (PostgreSQL, Redis) are started here as throwaway
# instances and stopped on exit, even on failure (scripts/services.sh), unless the caller already
# points SDMERGE_TEST_POSTGRES_URL and SDMERGE_TEST_REDIS_URL at running ones.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check merge_engine app worker migrations tests bench
if [ -n "${SDMERGE_TEST_POSTGRES_URL:-}" ] && [ -n "${SDMERGE_TEST_REDIS_URL:-}" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec bash scripts/services.sh run -- .venv/bin/python -m pytest "$@"
