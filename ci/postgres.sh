#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, from Debian's packages.
#
#   source ci/postgres.sh start   # installs PostgreSQL if needed, starts a cluster in a temp dir,
#                                 # exports TOTPD_TEST_DATABASE_URL
#   ci/postgres.sh stop DIR       # stops the cluster whose data dir is DIR (.ci/run traps it)
#
# PostgreSQL refuses to run as root, so the cluster belongs to the unprivileged `postgres` user
# that the Debian package creates; it listens on 127.0.0.1 and a socket in its own dir only.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && echo "$dir"
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else as_root runuser -u postgres -- "$@"; fi
}

start() {
    if [ -z "$(pg_bin)" ]; then
        echo "== installing postgresql (Debian)"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    fi
    local bin port dir
    bin=$(pg_bin)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/totpd-pg.XXXXXX")
    chmod 755 "$dir"
    as_root chown postgres "$dir"
    # A free port: ask the kernel for one.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 40000)))
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
    as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -q -c \
        "CREATE ROLE totpd LOGIN PASSWORD 'totpd' CREATEDB" -c "CREATE DATABASE totpd OWNER totpd"
    export TOTPD_TEST_PG_DIR="$dir"
    export TOTPD_TEST_PG_BIN="$bin"
    export TOTPD_TEST_DATABASE_URL="postgres://totpd:totpd@127.0.0.1:$port/totpd"
    echo "== PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (cluster in $dir)"
}

stop() {
    local dir=$1 bin
    bin=$(pg_bin)
    [ -d "$dir/data" ] && as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    as_root rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "$2" ;;
    *) echo "usage: source ci/postgres.sh start | ci/postgres.sh stop DIR" >&2; exit 2 ;;
esac
