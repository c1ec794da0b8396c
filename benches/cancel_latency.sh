#!/usr/bin/env bash
# Backend run time after client disconnect: direct PostgreSQL, PgBouncer and pgsluice, measured
# interleaved in one run against one throwaway cluster. Writes bench-results/cancel-latency.md.
#
# Usage: benches/cancel_latency.sh [bench flags]   (from anywhere, as root)
#   e.g. benches/cancel_latency.sh --tries 20      or      benches/cancel_latency.sh --quick
# Flags are passed to the bench binary (--tries N, --cap-ms MS, --quick, --out FILE).
# Environment: POOL=4 (server connections per proxy), SKIP_BUILD=1 (reuse release pgsluice).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POOL=${POOL:-4}
AS_PG=(runuser -u postgres --)
PIDS=()
WORK=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n $WORK && -f $WORK/pg/postmaster.pid ]]; then
        "${AS_PG[@]}" pg_ctl -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    [[ -n $WORK && -d $WORK && -z ${KEEP_WORK:-} ]] && rm -rf "$WORK"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port below the ephemeral range.
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        [[ -z $(ss -Htln "sport = :$p" 2>/dev/null) ]] && { echo "$p"; return 0; }
    done
    die "no free port"
}

wait_sql() {
    local port=$1 i
    for ((i = 0; i < 100; i++)); do
        psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

[[ $(id -u) == 0 ]] || die "run as root (servers run as the postgres user)"
command -v pgbouncer >/dev/null || die "pgbouncer not installed"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building pgsluice (release) and the bench"
    (cd "$REPO_DIR" && cargo build --release --bin pgsluice -q && cargo bench --bench cancel_latency --no-run -q)
fi
[[ -x $REPO_DIR/target/release/pgsluice ]] || die "missing target/release/pgsluice"

WORK=$(mktemp -d /tmp/pgsluice-cancel.XXXXXX)
chown postgres: "$WORK"
PGPORT=$(free_port)
"${AS_PG[@]}" initdb -D "$WORK/pg" -A trust -U postgres --no-sync >"$WORK/initdb.log" 2>&1 ||
    { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
"${AS_PG[@]}" pg_ctl -D "$WORK/pg" -l "$WORK/postgres.log" -w -t 60 \
    -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" \
    start >/dev/null || { cat "$WORK/postgres.log" >&2; die "postgres did not start"; }
log "postgres on 127.0.0.1:$PGPORT"

BPORT=$(free_port)
printf '"postgres" ""\n' >"$WORK/userlist.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_db_connections = $POOL
logfile = $WORK/pgbouncer.log
EOF
chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
"${AS_PG[@]}" pgbouncer "$WORK/pgbouncer.ini" >>"$WORK/pgbouncer.out" 2>&1 &
PIDS+=($!)
wait_sql "$BPORT" || { cat "$WORK/pgbouncer.out" >&2; die "pgbouncer did not start"; }
log "$(pgbouncer --version | head -1) on 127.0.0.1:$BPORT"

SPORT=$(free_port)
"$REPO_DIR/target/release/pgsluice" --listen "127.0.0.1:$SPORT" --admin-listen off \
    --upstream "postgres://postgres@127.0.0.1:$PGPORT/postgres" \
    --pool-size "$POOL" --pool-mode transaction >>"$WORK/pgsluice.log" 2>&1 &
PIDS+=($!)
wait_sql "$SPORT" || { tail -50 "$WORK/pgsluice.log" >&2; die "pgsluice did not start"; }
log "pgsluice on 127.0.0.1:$SPORT"

url() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }
cd "$REPO_DIR"
cargo bench -q --bench cancel_latency -- \
    --target "direct=$(url "$PGPORT")" \
    --target "pgbouncer=$(url "$BPORT")" \
    --target "pgsluice=$(url "$SPORT")" "$@"
