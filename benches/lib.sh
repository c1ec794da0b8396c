# Shared helpers for the benchmark scripts: a throwaway PostgreSQL, PgBouncer and pgsluice on
# free loopback ports, all torn down by bench_cleanup. Source it; do not run it.
#
# Servers run as the `postgres` user via setpriv rather than runuser: setpriv execs the program
# directly (so $! is the server's own pid, needed for CPU and RSS readings) and skips PAM, which
# would otherwise reset the raised open-files limit.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$BENCH_DIR/.." && pwd)"
PG_USER_RUN=(setpriv --reuid=postgres --regid=postgres --init-groups)
BENCH_PIDS=()
WORK=""
PGDATA_DIR=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Soft open-files limit up to the hard limit: every client socket is a descriptor in the
# load generator and in the proxy.
raise_nofile() {
    local want=${1:-65536} hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited && $hard -lt $want ]]; then want=$hard; fi
    ulimit -n "$want" || log "warning: could not raise open-files limit to $want"
    log "open-files limit: $(ulimit -n) (hard $(ulimit -Hn))"
}

# A free TCP port on 127.0.0.1 below the ephemeral range, so client sockets never take it.
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        if [[ -z $(ss -Htln "sport = :$p" 2>/dev/null) ]]; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

bench_workdir() {
    WORK=$(mktemp -d /tmp/pgsluice-bench.XXXXXX)
    chown postgres: "$WORK"
    chmod 755 "$WORK"
}

# Waits until a SELECT succeeds through host:port (up to $2 seconds).
wait_sql() {
    local port=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 5; i++)); do
        if psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# start_postgres PORT [extra -c settings...]
start_postgres() {
    local port=$1
    shift
    PGDATA_DIR="$WORK/pg"
    "${PG_USER_RUN[@]}" initdb -D "$PGDATA_DIR" -A trust -U postgres --no-sync >"$WORK/initdb.log" 2>&1 ||
        { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    local opts="-p $port -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300"
    opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    local extra
    for extra in "$@"; do opts+=" -c $extra"; done
    "${PG_USER_RUN[@]}" pg_ctl -D "$PGDATA_DIR" -l "$WORK/postgres.log" -w -t 60 -o "$opts" start >/dev/null ||
        { cat "$WORK/postgres.log" >&2; die "postgres did not start"; }
    log "postgres $(initdb --version | sed "s/.*) //") on 127.0.0.1:$port"
}

postgres_pid() { head -1 "$PGDATA_DIR/postmaster.pid"; }

# start_pgbouncer PORT PGPORT POOL MAX_CLIENT_CONN; sets PGBOUNCER_PID
start_pgbouncer() {
    local port=$1 pgport=$2 pool=$3 maxc=$4
    command -v pgbouncer >/dev/null || die "pgbouncer not installed"
    printf '"postgres" ""\n' >"$WORK/userlist.txt"
    cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$pgport dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $pool
max_db_connections = $pool
max_client_conn = $maxc
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
    chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
    "${PG_USER_RUN[@]}" pgbouncer "$WORK/pgbouncer.ini" >>"$WORK/pgbouncer.out" 2>&1 &
    PGBOUNCER_PID=$!
    BENCH_PIDS+=("$PGBOUNCER_PID")
    wait_sql "$port" 20 || { cat "$WORK/pgbouncer.out" "$WORK/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer did not start"; }
    log "$(pgbouncer --version | head -1) on 127.0.0.1:$port (pid $PGBOUNCER_PID)"
}

# start_pgsluice PORT PGPORT POOL; sets PGSLUICE_PID and PGSLUICE_ADMIN (its admin port).
# Extra args pass through. PGSLUICE_BIN overrides the binary (e.g. an older build kept for a
# before/after run).
start_pgsluice() {
    local port=$1 pgport=$2 pool=$3
    shift 3
    local bin="${PGSLUICE_BIN:-$REPO_DIR/target/release/pgsluice}" aport
    [[ -x $bin ]] || die "missing $bin (cargo build --release)"
    aport=$(free_port)
    "$bin" --listen "127.0.0.1:$port" --upstream "postgres://postgres@127.0.0.1:$pgport/postgres" \
        --pool-size "$pool" --pool-mode transaction --admin-listen "127.0.0.1:$aport" "$@" \
        >>"$WORK/pgsluice.log" 2>&1 &
    PGSLUICE_PID=$!
    PGSLUICE_ADMIN=$aport
    BENCH_PIDS+=("$PGSLUICE_PID")
    wait_sql "$port" 20 || { tail -50 "$WORK/pgsluice.log" >&2; die "pgsluice did not start"; }
    log "pgsluice on 127.0.0.1:$port (pid $PGSLUICE_PID, admin $aport)"
}

# utime+stime of a process, in seconds.
proc_cpu_seconds() {
    local pid=$1 stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || { echo 0; return; }
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    stat=${stat##*) }
    awk -v tck="$(getconf CLK_TCK)" '{ printf "%.2f", ($12 + $13) / tck }' <<<"$stat"
}

proc_rss_bytes() {
    awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"
}

bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $PGDATA_DIR && -f $PGDATA_DIR/postmaster.pid ]]; then
        "${PG_USER_RUN[@]}" pg_ctl -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [[ -n $WORK && -d $WORK && -z ${KEEP_WORK:-} ]]; then
        rm -rf "$WORK"
    fi
}

# Builds a harness-less bench target and prints its executable path.
bench_exe() {
    local name=$1 exe
    exe=$(cd "$REPO_DIR" && cargo bench --bench "$name" --no-run --message-format=json 2>/dev/null |
        grep -o "\"executable\":\"[^\"]*/deps/$name-[0-9a-f]*\"" | tail -1 | cut -d'"' -f4)
    [[ -n $exe && -x $exe ]] || die "could not build bench target $name (cargo bench --bench $name --no-run)"
    echo "$exe"
}
