#!/usr/bin/env bash
# What one transaction costs each pooler beyond its TPS: system calls per transaction by kind
# (strace -c), user and system CPU per 100k transactions (/proc/<pid>/stat), and context
# switches per transaction (/proc/<pid>/task/*/status), for PgBouncer and pgsluice variants,
# interleaved so background load falls on all of them alike.
#
# Usage: benches/hotpath.sh   (as root, from the repository root)
# Knobs (environment):
#   DUR=10          seconds of each CPU run (no tracer attached)
#   STRACE_DUR=4    seconds of each strace run, a separate pgbench run; strace slows the proxy
#                   many times over, so only its counts per transaction are reported
#   REPS=3          rounds; each round runs every (mode, variant): CPU run, then strace run
#   CLIENTS=32  MODES="simple extended"  POOL=16  SCALE=10
#   VARIANTS="pgbouncer pgsluice=:2 pgsluice-t1=:1"
#                   `pgbouncer`, or NAME=BINARY:THREADS for a pgsluice: BINARY empty means
#                   target/release/pgsluice; THREADS is its TOKIO_WORKER_THREADS
#   PGSLUICE_ARGS="..."  SKIP_BUILD=1  OUT_DIR=bench-results
# Context switches are summed over the threads alive at each reading (a thread that exits
# in between drops out: pgsluice's workers live as long as the process).
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DUR=${DUR:-10}
STRACE_DUR=${STRACE_DUR:-4}
REPS=${REPS:-3}
CLIENTS=${CLIENTS:-32}
MODES=${MODES:-"simple extended"}
POOL=${POOL:-16}
SCALE=${SCALE:-10}
VARIANTS=${VARIANTS:-"pgbouncer pgsluice=:2 pgsluice-t1=:1"}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench-results}
read -r -a PGSLUICE_EXTRA <<<"${PGSLUICE_ARGS:-}"

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
command -v strace >/dev/null || die "strace not installed (apt-get install -y strace)"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
raise_nofile 65536

if [[ $VARIANTS == *"=:"* && ${SKIP_BUILD:-0} != 1 ]]; then
    log "building pgsluice (release)"
    (cd "$REPO_DIR" && cargo build --release --bin pgsluice -q)
fi

bench_workdir
PGPORT=$(free_port)
start_postgres "$PGPORT"
log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

declare -A PORT PID
NAMES=()
for v in $VARIANTS; do
    name=${v%%=*}
    NAMES+=("$name")
    PORT[$name]=$(free_port)
    if [[ $v == pgbouncer ]]; then
        start_pgbouncer "${PORT[$name]}" "$PGPORT" "$POOL" 1000
        PID[$name]=$PGBOUNCER_PID
        continue
    fi
    [[ $v == *=*:* ]] || die "variant $v: want pgbouncer or NAME=BINARY:THREADS"
    spec=${v#*=}
    bin=${spec%:*}
    export TOKIO_WORKER_THREADS=${spec##*:}
    PGSLUICE_BIN=${bin:-$REPO_DIR/target/release/pgsluice} \
        start_pgsluice "${PORT[$name]}" "$PGPORT" "$POOL" "${PGSLUICE_EXTRA[@]}"
    unset TOKIO_WORKER_THREADS
    PID[$name]=$PGSLUICE_PID
    log "$name: $(tr '\0' ' ' <"/proc/$PGSLUICE_PID/environ" | grep -o 'TOKIO_WORKER_THREADS=[0-9]*'), $(ls "/proc/$PGSLUICE_PID/task" | wc -l) threads"
done

# Taken before the runs: the source the default binary was built from, if it was just built.
commit=$(cd "$REPO_DIR" && git rev-parse --short HEAD)$(cd "$REPO_DIR" && git diff --quiet HEAD -- src || echo "+dirty")
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT_DIR/hotpath-$STAMP.tsv"
TABLE="$OUT_DIR/hotpath-$STAMP.md"
: >"$RAW"

# utime and stime in clock ticks, then voluntary and involuntary context switches.
proc_counters() {
    local pid=$1 stat
    stat=$(cat "/proc/$pid/stat")
    stat=${stat##*) }
    awk '{ printf "%s %s", $12, $13 }' <<<"$stat"
    cat /proc/"$pid"/task/*/status 2>/dev/null |
        awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { printf " %d %d\n", v, n }'
}

pgbench_run() {
    local name=$1 mode=$2 clients=$3 secs=$4 out=$5
    pgbench -n -S -j 2 -c "$clients" -T "$secs" -M "$mode" \
        -h 127.0.0.1 -p "${PORT[$name]}" -U postgres postgres >"$out" 2>&1 ||
        { log "pgbench failed: $name $mode"; tail -5 "$out" >&2; }
    awk '/number of transactions actually processed:/ { print $NF; exit }' "$out"
}

cpu_run() {
    local name=$1 mode=$2 clients=$3 rep=$4 pid=${PID[$1]} a b txns tps
    a=$(proc_counters "$pid")
    txns=$(pgbench_run "$name" "$mode" "$clients" "$DUR" "$WORK/cpu.out")
    b=$(proc_counters "$pid")
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited during the run"
    tps=$(awk '/^tps = / { print $3; exit }' "$WORK/cpu.out")
    read -r u0 s0 v0 n0 <<<"$a"
    read -r u1 s1 v1 n1 <<<"$b"
    printf 'cpu\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$mode" "$clients" "$rep" "${tps:-0}" \
        "${txns:-0}" $((u1 - u0)) $((s1 - s0)) $((v1 - v0)) $((n1 - n0)) >>"$RAW"
    log "$name -M $mode -c $clients rep $rep: tps=${tps:-0} utime=$((u1 - u0)) stime=$((s1 - s0)) ticks, cs=$((v1 - v0))+$((n1 - n0))"
}

strace_run() {
    local name=$1 mode=$2 clients=$3 rep=$4 pid=${PID[$1]} spid txns i
    local sum="$WORK/strace.txt"
    rm -f "$sum"
    # -f with -p attaches every thread of the process.
    strace -c -f -p "$pid" -o "$sum" 2>"$WORK/strace.err" &
    spid=$!
    sleep 1
    txns=$(pgbench_run "$name" "$mode" "$clients" "$STRACE_DUR" "$WORK/strace.out")
    kill -INT "$spid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.1
    done
    wait "$spid" 2>/dev/null || true
    [[ -s $sum ]] || { cat "$WORK/strace.err" >&2; die "strace wrote no summary for $name"; }
    # Summary rows: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v pre="sys\t$name\t$mode\t$clients\t$rep\t${txns:-0}" '
        /^-/ || /% time/ || $NF == "total" || NF < 5 { next }
        { printf "%s\t%s\t%s\t%s\n", pre, $NF, $4, (NF == 6 ? $5 : 0) }' "$sum" >>"$RAW"
    log "$name -M $mode strace rep $rep: $txns tx, $(awk '$NF == "total" { print $4 }' "$sum") syscalls"
}

for rep in $(seq 1 "$REPS"); do
    for mode in $MODES; do
        for clients in $CLIENTS; do
            for name in "${NAMES[@]}"; do
                cpu_run "$name" "$mode" "$clients" "$rep"
                strace_run "$name" "$mode" "$clients" "$rep"
            done
        done
    done
done

{
    echo "# Per-transaction cost ($STAMP, repository at $commit when the run started)"
    echo
    echo "pgbench -S -j 2, CPU runs -T $DUR, strace runs -T $STRACE_DUR, scale $SCALE, pool $POOL, $REPS rep(s), median per cell."
    echo "Variants: $VARIANTS${PGSLUICE_ARGS:+; pgsluice flags: $PGSLUICE_ARGS}. Host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| target | mode | clients | TPS | user CPU s / 100k tx | system CPU s / 100k tx | total | voluntary cs / tx | involuntary cs / tx |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' -v tck="$(getconf CLK_TCK)" '
        function median(s,   a, n, i, j, t) {
            n = split(s, a, " ")
            for (i = 2; i <= n; i++) { t = a[i]; j = i - 1; while (j > 0 && a[j] + 0 > t + 0) { a[j + 1] = a[j]; j-- } a[j + 1] = t }
            if (n == 0) return 0
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        $1 == "cpu" && $7 > 0 {
            k = $2 SUBSEP $3 SUBSEP $4
            if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
            per = 100000 / $7
            tps[k] = tps[k] " " $6; u[k] = u[k] " " ($8 / tck * per); s[k] = s[k] " " ($9 / tck * per)
            t[k] = t[k] " " (($8 + $9) / tck * per); v[k] = v[k] " " ($10 / $7); n[k] = n[k] " " ($11 / $7)
        }
        END {
            for (i = 1; i <= nk; i++) {
                k = order[i]; split(k, f, SUBSEP)
                printf "| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", f[1], f[2], f[3], median(tps[k]), median(u[k]), median(s[k]), median(t[k]), median(v[k]), median(n[k])
            }
        }' "$RAW"
    echo
    echo "System calls per transaction (strace -c -f on the pooler; calls in each strace run over the transactions pgbench completed in it)."
    echo "The strace window includes pgbench's connects and disconnects (a fixed few dozen calls per client)."
    echo
    echo "| target | mode | clients | recvfrom | of which EAGAIN | sendto | epoll_wait | futex | other | total | other, by kind (>= 0.01 / tx) |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    awk -F'\t' '
        function median(s,   a, n, i, j, t) {
            n = split(s, a, " ")
            for (i = 2; i <= n; i++) { t = a[i]; j = i - 1; while (j > 0 && a[j] + 0 > t + 0) { a[j + 1] = a[j]; j-- } a[j + 1] = t }
            if (n == 0) return 0
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        $1 == "sys" && $6 > 0 {
            k = $2 SUBSEP $3 SUBSEP $4; r = k SUBSEP $5
            if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
            if (!(r in rseen)) { rseen[r] = 1; reps[k] = reps[k] " " $5; tx[r] = $6 }
            c[r SUBSEP $7] += $8; e[r SUBSEP $7] += $9; tot[r] += $8
            if ($7 !~ /^(recvfrom|sendto|epoll_wait|futex)$/) { oth[r] += $8; if (!((k SUBSEP $7) in onames)) { onames[k SUBSEP $7] = 1; olist[k] = olist[k] " " $7 } }
        }
        function med(k, what, sc,   nr, rr, i, r, acc) {
            nr = split(reps[k], rr, " "); acc = ""
            for (i = 1; i <= nr; i++) {
                r = k SUBSEP rr[i]
                if (what == "total") acc = acc " " (tot[r] / tx[r])
                else if (what == "other") acc = acc " " (oth[r] / tx[r])
                else if (what == "err") acc = acc " " (e[r SUBSEP sc] / tx[r])
                else acc = acc " " (c[r SUBSEP sc] / tx[r])
            }
            return median(acc)
        }
        END {
            for (i = 1; i <= nk; i++) {
                k = order[i]; split(k, f, SUBSEP)
                m = split(olist[k], on, " "); ol = ""
                for (j = 1; j <= m; j++) { x = med(k, "calls", on[j]); if (x >= 0.01) ol = ol sprintf("%s %.2f, ", on[j], x) }
                sub(/, $/, "", ol)
                printf "| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s |\n", f[1], f[2], f[3], med(k, "calls", "recvfrom"), med(k, "err", "recvfrom"), med(k, "calls", "sendto"), med(k, "calls", "epoll_wait"), med(k, "calls", "futex"), med(k, "other"), med(k, "total"), ol
            }
        }' "$RAW"
    echo
    echo "Raw rows: $(basename "$RAW")"
} >"$TABLE"
cat "$TABLE"
log "wrote $TABLE"
