#!/usr/bin/env bash
# Runs the whole suite. Services the tests need (PostgreSQL, Redis) are started here as throwaway
# instances and stopped on exit, even on failure (scripts/services.sh), unless the caller already
# points SDMERGE_TEST_POSTGRES_URL and SDMERGE_TEST_REDIS_URL at running ones. The browser tests
# (tests/browser) drive Debian's Chromium with Playwright: it is installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_chromium() {
    # Playwright's own browser download cannot work on our machines; Debian's package does.
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing chromium with apt-get" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
            || { echo "test.sh: could not install chromium" >&2; exit 1; }
    fi
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null && return
    [ "${SDMERGE_TEST_ALLOW_SKIP:-}" = 1 ] && { echo "test.sh: no chromium: the browser tests will skip" >&2; return; }
    echo "test.sh: chromium not found; apt-get install -y chromium (or SDMERGE_TEST_ALLOW_SKIP=1)" >&2
    exit 1
}

ensure_compose() {
    # tests/test_deployment.py checks docker-compose.yml with a real compose parser; Debian's
    # standalone docker-compose needs no Docker engine for `config`.
    command -v docker-compose >/dev/null && return
    docker compose version >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing docker-compose with apt-get" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } >&2 \
            || echo "test.sh: could not install docker-compose: its check will skip" >&2
    fi
}

.venv/bin/ruff check merge_engine app worker migrations tests bench
ensure_chromium
ensure_compose
if [ -n "${SDMERGE_TEST_POSTGRES_URL:-}" ] && [ -n "${SDMERGE_TEST_REDIS_URL:-}" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec bash scripts/services.sh run -- .venv/bin/python -m pytest "$@"
