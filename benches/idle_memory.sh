#!/usr/bin/env bash
# Resident memory each proxy spends per idle client: RSS with N idle clients connected, minus
# RSS of the same freshly started proxy with none, over N. A fresh proxy per (proxy, N) so
# memory kept by the allocator from an earlier round does not hide the cost.
#
# Usage: benches/idle_memory.sh   (as root, from the repository root)
# Knobs: COUNTS="1000 10000"  PROXIES="pgbouncer pgsluice"  POOL=16  OUT_DIR=bench-results
#        SKIP_BUILD=1 (use existing binaries)  PGSLUICE_ARGS="..." (extra pgsluice flags)
# The open-files limit is raised to the hard limit (20000 here): each idle client is one
# descriptor in the client tool and one in the proxy.
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNTS=${COUNTS:-"1000 10000"}
PROXIES=${PROXIES:-"pgbouncer pgsluice"}
POOL=${POOL:-16}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench-results}
read -r -a PGSLUICE_EXTRA <<<"${PGSLUICE_ARGS:-}"

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
raise_nofile 65536

if [[ ${SKIP_BUILD:-0} != 1 && " $PROXIES " == *" pgsluice "* ]]; then
    log "building pgsluice (release)"
    (cd "$REPO_DIR" && cargo build --release --bin pgsluice -q)
fi
IDLE=$(bench_exe idle_clients)

bench_workdir
PGPORT=$(free_port)
start_postgres "$PGPORT"

mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
TABLE="$OUT_DIR/idle-memory-$STAMP.md"
ROWS=()
status=0

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

for proxy in $PROXIES; do
    for n in $COUNTS; do
        port=$(free_port)
        case $proxy in
            pgbouncer) start_pgbouncer "$port" "$PGPORT" "$POOL" $((n + 1000)) && pid=$PGBOUNCER_PID ;;
            pgsluice) start_pgsluice "$port" "$PGPORT" "$POOL" --max-client-conn $((n + 1000)) "${PGSLUICE_EXTRA[@]}" && pid=$PGSLUICE_PID ;;
            *) die "unknown proxy $proxy" ;;
        esac
        sleep 1
        rss0=$(proc_rss_bytes "$pid")
        out="$WORK/idle-$proxy-$n.out"
        "$IDLE" --addr "127.0.0.1:$port" --clients "$n" --hold 600 >"$out" 2>&1 &
        cpid=$!
        ready=""
        for ((i = 0; i < 600; i++)); do
            ready=$(grep -m1 '^READY' "$out" || true)
            [[ -n $ready ]] && break
            kill -0 "$cpid" 2>/dev/null || break
            sleep 0.2
        done
        [[ -n $ready ]] || { cat "$out" >&2; stop_pid "$cpid"; die "idle clients never got ready"; }
        sleep 2
        rssn=$(proc_rss_bytes "$pid")
        ok=$(sed -n 's/^READY ok=\([0-9]*\).*/\1/p' <<<"$ready")
        failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$ready")
        if [[ $failed != 0 ]]; then
            log "$proxy: $failed of $n clients failed: $(grep -m1 'first failure' "$out" || true)"
            status=1
        fi
        per=$(awk -v a="$rss0" -v b="$rssn" -v n="$ok" 'BEGIN { if (n > 0) printf "%.0f", (b - a) / n; else print "-" }')
        log "$proxy n=$n ok=$ok: RSS0=$rss0 RSSn=$rssn => $per bytes/client"
        ROWS+=("| $proxy | $n | $ok | $failed | $((rss0 / 1024)) | $((rssn / 1024)) | $per |")
        stop_pid "$cpid"
        stop_pid "$pid"
    done
done

{
    echo "# Idle client memory ($STAMP)"
    echo
    echo "RSS of a freshly started proxy before and with N idle clients (start-up done, no queries); pool $POOL."
    echo
    echo "| proxy | clients | connected | failed | RSS before KiB | RSS with clients KiB | bytes per idle client |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
} >"$TABLE"
cat "$TABLE"
log "wrote $TABLE"
exit "$status"
