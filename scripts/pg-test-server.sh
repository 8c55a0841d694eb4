#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (CI and local runs).
#
#   eval "$(scripts/pg-test-server.sh start)"   # prints export KMD_TEST_PG_URL=... KMD_TEST_PG_DIR=...
#   scripts/pg-test-server.sh stop "$KMD_TEST_PG_DIR"
#
# `start` finds the server binaries (PATH, then /usr/lib/postgresql/*/bin); when they are
# missing and we are root it installs Debian's `postgresql` package first. The cluster
# lives in a fresh temporary directory, runs as an unprivileged user (PostgreSQL refuses
# root; as root we use the `postgres` account the package creates), listens on loopback
# only, on a free port, with trust authentication and fsync off: a test fixture, never a
# real database. Everything but the export lines goes to stderr.
set -euo pipefail

find_bin_dir() {
    if command -v pg_ctl >/dev/null 2>&1; then  # follow links: createdb sits beside the real one
        local real
        real=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
        if [ -x "$real/initdb" ] && [ -x "$real/createdb" ]; then
            echo "$real"
            return
        fi
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ] && [ -x "$dir/createdb" ]; then
        echo "$dir"
    fi
}

as_owner() {  # run a command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin
    bin=$(find_bin_dir)
    if [ -z "$bin" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "pg-test-server: no PostgreSQL server binaries and not root: install Debian's postgresql package" >&2
            exit 1
        fi
        echo "pg-test-server: installing PostgreSQL from the Debian packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends postgresql >&2
        bin=$(find_bin_dir)
        [ -n "$bin" ] || { echo "pg-test-server: postgresql installed but pg_ctl not found" >&2; exit 1; }
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    fi
    local dir port
    dir=$(mktemp -d "${TMPDIR:-/tmp}/kmd-pg.XXXXXX")
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres kmd_test >&2
    echo "pg-test-server: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)" >&2
    echo "export KMD_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$port/kmd_test"
    echo "export KMD_TEST_PG_DIR=$dir"
}

stop() {
    local dir=${1:?usage: pg-test-server.sh stop DIR}
    local bin
    bin=$(find_bin_dir)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
