#!/usr/bin/env bash
# PostgreSQL's own regression suite (pg_regress, parallel schedule) run three ways against one
# throwaway cluster: directly, through pgsluice in session mode, and through pgsluice in
# transaction mode. Prints the failing test set of each and what session/transaction mode
# fail beyond the direct run. Results and their explanations: docs/RELIABILITY.md, "pg_regress".
#
#   tests/pg_regress/run.sh [SUITE_DIR] [MODE...]      MODE: direct session transaction
#
# SUITE_DIR holds src/test/regress of the installed server's version (sql/, expected/, data/,
# parallel_schedule, regress.c); default /work/shared/pg-regress-15, or $PG_REGRESS_SUITE.
# Needs: the server binaries, pg_regress and PGXS from postgresql-server-dev-<major> pinned to
# the server's version (see the HOWTO next to the suite), root (the cluster and pg_regress run
# as the `postgres` OS user: server-side COPY writes into the output dir), and a release build
# of pgsluice (built here when target/release/pgsluice is missing, or with PG_REGRESS_BUILD=1). Everything is on loopback;
# the scratch directory (kept, with each mode's regression.diffs) is printed at the end.
# Takes a few minutes per mode on 2 cores.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=${PG_REGRESS_SUITE:-/work/shared/pg-regress-15}
if [[ $# -gt 0 && -d $1 ]]; then SUITE=$(cd "$1" && pwd); shift; fi
MODES=("$@")
[[ ${#MODES[@]} -gt 0 ]] || MODES=(direct session transaction)

BINDIR=$(pg_config --bindir)
PKGLIB=$(pg_config --pkglibdir)
PG_REGRESS=$(dirname "$(pg_config --pgxs)")/../test/regress/pg_regress
[[ -x $PG_REGRESS ]] || { echo "pg_regress not found at $PG_REGRESS (install postgresql-server-dev-<major>)" >&2; exit 2; }
[[ -f $SUITE/parallel_schedule ]] || { echo "no parallel_schedule in $SUITE" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "run as root (the cluster and pg_regress run as user postgres)" >&2; exit 2; }

PROXY=$ROOT/target/release/pgsluice
if [[ " ${MODES[*]} " != " direct " && (! -x $PROXY || ${PG_REGRESS_BUILD:-0} == 1) ]]; then
    (cd "$ROOT" && cargo build --release --bin pgsluice)
fi

WORK=$(mktemp -d /tmp/pg_regress.XXXXXX)
chown postgres: "$WORK"
as_pg() { runuser -u postgres -- env -u PGOPTIONS -u PGHOST -u PGPORT -u PGDATABASE -u PGUSER "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# regress.so, plus the contrib modules the tests load from the same --dlpath.
mkdir -p "$WORK/lib"
cp "$SUITE/regress.c" "$WORK/lib/"
printf 'MODULES = regress\nPG_CONFIG = pg_config\nPGXS := $(shell $(PG_CONFIG) --pgxs)\ninclude $(PGXS)\n' >"$WORK/lib/Makefile"
make -s -C "$WORK/lib" >"$WORK/lib/build.log" 2>&1 || { cat "$WORK/lib/build.log" >&2; exit 1; }
ln -sf "$PKGLIB/autoinc.so" "$PKGLIB/refint.so" "$WORK/lib/"
chown -R postgres: "$WORK/lib"

PGPORT_=$(free_port)
as_pg "$BINDIR/initdb" -D "$WORK/data" -U postgres -A trust --no-sync >"$WORK/initdb.log"
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PGPORT_
unix_socket_directories = '$WORK'
max_connections = 200
fsync = off
EOF
as_pg "$BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w start >/dev/null
PROXY_PID=
cleanup() {
    [[ -n $PROXY_PID ]] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
    as_pg "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql_direct() { as_pg "$BINDIR/psql" -X -q -h 127.0.0.1 -p "$PGPORT_" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

# A fresh "regression" database with the settings pg_regress itself would give it.
fresh_db() {
    psql_direct -c 'DROP DATABASE IF EXISTS "regression" WITH (FORCE)' \
        -c 'CREATE DATABASE "regression" TEMPLATE=template0' \
        -c "ALTER DATABASE \"regression\" SET lc_messages TO 'C'" \
        -c "ALTER DATABASE \"regression\" SET lc_monetary TO 'C'" \
        -c "ALTER DATABASE \"regression\" SET lc_numeric TO 'C'" \
        -c "ALTER DATABASE \"regression\" SET lc_time TO 'C'" \
        -c "ALTER DATABASE \"regression\" SET bytea_output TO 'hex'" \
        -c "ALTER DATABASE \"regression\" SET timezone_abbreviations TO 'Default'"
    # Roles and tablespaces a failed run may leave behind would fail the next one.
    psql_direct -At -c "SELECT 'DROP ROLE ' || quote_ident(rolname) FROM pg_roles WHERE rolname LIKE 'regress%'" |
        psql_direct >/dev/null 2>&1 || true
}

failing() { awk '/ \.\.\. / && /FAILED/ { for (i = 1; i < NF; i++) if ($(i+1) == "...") { print $i; break } }' "$1" | sort -u; }

declare -A FAILED
for mode in "${MODES[@]}"; do
    out=$WORK/$mode
    mkdir -p "$out" && chown postgres: "$out"
    fresh_db
    port=$PGPORT_
    if [[ $mode != direct ]]; then
        port=$(free_port)
        # Up to 20 tests run at once, each with a few connections of its own.
        pool=40 limit=0
        # Transaction mode: a session advisory lock stays on whichever server connection
        # took it, so advisory_lock's next transaction can wait for it forever; a query
        # timeout turns that stall into a 57014 failure and lets the run finish.
        [[ $mode == transaction ]] && pool=20 limit=30s
        "$PROXY" --listen "127.0.0.1:$port" --admin-listen off \
            --upstream "postgres://postgres@127.0.0.1:$PGPORT_/postgres" \
            --pool-mode "$mode" --pool-size "$pool" --codel-interval 0 --queue-timeout 60s \
            --query-timeout "$limit" \
            >"$out/pgsluice.log" 2>&1 &
        PROXY_PID=$!
        for _ in $(seq 100); do
            (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
    fi
    t0=$(date +%s)
    set +e
    as_pg "$PG_REGRESS" --use-existing --host=127.0.0.1 --port="$port" --user=postgres \
        --bindir="$BINDIR" --inputdir="$SUITE" --outputdir="$out" --dlpath="$WORK/lib" \
        --schedule="$SUITE/parallel_schedule" --max-concurrent-tests=20 >"$out/pg_regress.log" 2>&1
    set -e
    secs=$(($(date +%s) - t0))
    if [[ -n $PROXY_PID ]]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        PROXY_PID=
    fi
    FAILED[$mode]=$(failing "$out/pg_regress.log" | tr '\n' ' ')
    total=$(grep -cE ' \.\.\. ' "$out/pg_regress.log" || true)
    nfail=$(wc -w <<<"${FAILED[$mode]}")
    echo "$mode: $nfail of $total tests failed in ${secs}s: ${FAILED[$mode]:-none}"
done

if [[ -n ${FAILED[direct]+x} ]]; then
    for mode in session transaction; do
        [[ -n ${FAILED[$mode]+x} ]] || continue
        extra=$(comm -13 <(tr ' ' '\n' <<<"${FAILED[direct]}" | sed '/^$/d' | sort) \
            <(tr ' ' '\n' <<<"${FAILED[$mode]}" | sed '/^$/d' | sort) | tr '\n' ' ')
        echo "$mode beyond direct: ${extra:-none}"
    done
fi
echo "scratch (diffs in <mode>/regression.diffs, proxy logs in <mode>/pgsluice.log): $WORK"
