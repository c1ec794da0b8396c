#!/usr/bin/env bash
# Markdown table from compare.sh raw rows: medians per (target, mode, clients).
# Usage: benches/compare_report.sh RAW.tsv DUR SCALE POOL REPS
set -euo pipefail
RAW=$1 DUR=$2 SCALE=$3 POOL=$4 REPS=$5

# CPU seconds per 100k transactions is computed for each rep, then medianed like the rest.
echo "# pgbench -S comparison ($(basename "$RAW" .tsv | sed "s/^compare-//"))"
echo
echo "pgbench -S -j 2 -T $DUR, scale $SCALE, pool $POOL (transaction mode), $REPS rep(s), median per cell."
echo "Host: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)."
echo
echo "| target | mode | clients | TPS (median) | mean latency ms | p99 latency ms | proxy CPU s / 100k tx | failed tx | aborted runs | clients aborted (max) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
tail -n +2 "$RAW" | awk -F'\t' '
    function median(s,   a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; j = i - 1; while (j > 0 && a[j] + 0 > t + 0) { a[j + 1] = a[j]; j-- } a[j + 1] = t }
        if (n == 0) return ""
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        k = $1 SUBSEP $2 SUBSEP $3
        if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
        tps[k] = tps[k] " " $5; lat[k] = lat[k] " " $6; p99[k] = p99[k] " " $7
        if ($8 != "" && $9 > 0) cpu[k] = cpu[k] " " ($8 / ($9 / 100000))
        fail[k] += $10; abort[k] += $11; if (NF < 12) nogone[k] = 1; else if ($12 + 0 > gone[k]) gone[k] = $12 + 0
    }
    END {
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, f, SUBSEP)
            c = (k in cpu) ? sprintf("%.2f", median(cpu[k])) : "-"
            g = (abort[k] == 0) ? 0 : ((k in nogone) ? "?" : gone[k] + 0)
            printf "| %s | %s | %s | %.0f | %.3f | %.3f | %s | %d | %d | %s |\n", f[1], f[2], f[3], median(tps[k]), median(lat[k]), median(p99[k]), c, fail[k], abort[k], g
        }
    }' | sort -t'|' -k3,3 -k4,4n -k2,2
echo
echo "An aborted run is one where some pgbench clients hit an error and stopped; the rest ran to the end, so its figures come from fewer clients."
echo "Raw rows: $(basename "$RAW")"
