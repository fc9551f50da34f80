#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis for the test suite, on free ports in a temporary folder.
#
#   scripts/services.sh run -- COMMAND...   start both, run COMMAND with SDMERGE_TEST_POSTGRES_URL
#                                           and SDMERGE_TEST_REDIS_URL exported, stop both (always)
#
# PostgreSQL refuses to run as root, so as root its cluster belongs to the `postgres` user.
set -euo pipefail

die() { echo "services.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_bin() {
    local dir
    for dir in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin /usr/local/bin /usr/bin; do
        [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return; }
    done
    die "PostgreSQL (initdb, pg_ctl) not found; install postgresql"
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_redis() {
    # A fresh machine of ours has PostgreSQL but not Redis: install it when we can (as root).
    command -v redis-server >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "services.sh: installing redis-server with apt-get" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >&2 \
            || die "could not install redis-server"
    fi
    command -v redis-server >/dev/null || die "redis-server not found; apt-get install -y redis-server"
}

start_services() {
    SERVICES_DIR=$(mktemp -d /tmp/sdmerge-services.XXXXXX)
    chmod 755 "$SERVICES_DIR"
    local bin pg_port redis_port
    bin=$(pg_bin)
    ensure_redis
    mkdir "$SERVICES_DIR/pg"
    [ "$(id -u)" = 0 ] && chown postgres "$SERVICES_DIR/pg"
    as_pg "$bin/initdb" -D "$SERVICES_DIR/pg/data" -A trust -U postgres --no-sync -E UTF8 >"$SERVICES_DIR/initdb.log" 2>&1 \
        || { cat "$SERVICES_DIR/initdb.log" >&2; die "initdb failed"; }
    pg_port=$(free_port)
    as_pg "$bin/pg_ctl" -D "$SERVICES_DIR/pg/data" -l "$SERVICES_DIR/pg/server.log" -w -t 60 \
        -o "-p $pg_port -k $SERVICES_DIR/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null || { cat "$SERVICES_DIR/pg/server.log" >&2; die "postgres did not start"; }
    PG_BIN=$bin
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --dir "$SERVICES_DIR" --pidfile "$SERVICES_DIR/redis.pid" --logfile "$SERVICES_DIR/redis.log"
    for _ in $(seq 50); do [ -s "$SERVICES_DIR/redis.pid" ] && break; sleep 0.1; done
    export SDMERGE_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$pg_port/postgres"
    export SDMERGE_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
    echo "services.sh: postgres $SDMERGE_TEST_POSTGRES_URL, redis $SDMERGE_TEST_REDIS_URL" >&2
}

stop_services() {
    [ -n "${SERVICES_DIR:-}" ] && [ -d "$SERVICES_DIR" ] || return 0
    if [ -s "$SERVICES_DIR/redis.pid" ]; then
        kill "$(cat "$SERVICES_DIR/redis.pid")" 2>/dev/null || true
    fi
    if [ -n "${PG_BIN:-}" ] && [ -f "$SERVICES_DIR/pg/data/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$SERVICES_DIR/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$SERVICES_DIR"
    SERVICES_DIR=
}

case "${1:-}" in
    run)
        shift
        [ "${1:-}" = "--" ] && shift
        [ $# -gt 0 ] || die "usage: $0 run -- COMMAND..."
        trap stop_services EXIT
        trap 'exit 130' INT TERM
        start_services
        status=0
        "$@" || status=$?
        exit "$status"
        ;;
    *)
        die "usage: $0 run -- COMMAND..."
        ;;
esac
