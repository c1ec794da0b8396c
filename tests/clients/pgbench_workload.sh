#!/usr/bin/env bash
# pgbench workload for the client compatibility matrix (tests/client_matrix.rs):
# `pgbench -M prepared -S` with 32 clients for a bounded time. -M prepared makes every
# client Parse its named statements once and then only Bind/Execute them, whichever server
# connection each transaction lands on. Connects with the PG* environment variables.
# Prints one JSON line per check; exits 1 if any check failed.
set -uo pipefail

PGBENCH="${PGBENCH:-pgbench}"
CLIENTS="${PGBENCH_CLIENTS:-32}"
SECONDS_RUN="${PGBENCH_SECONDS:-5}"
WORK=$(mktemp -d)
trap 'rm -rf "${WORK}"' EXIT
failed=0

report() {
    local check="$1" ok="$2" detail="$3"
    [ "${ok}" = true ] || failed=1
    detail=${detail//\\/\\\\}
    detail=${detail//\"/\\\"}
    detail=$(printf '%s' "${detail}" | tr '\n\t' '  ')
    printf '{"client":"pgbench","check":"%s","ok":%s,"detail":"%s"}\n' "${check}" "${ok}" "${detail}"
}

# pgbench's tables are shared by every run against this database: initialise once, small.
if "${PGBENCH}" -i -s 1 -q >"${WORK}/init" 2>&1; then
    report init true "$("${PGBENCH}" --version), pgbench -i -s 1 (COPY, DDL, VACUUM)"
else
    report init false "$(tail -c 400 "${WORK}/init")"
    exit 1
fi

cmd="${PGBENCH} -M prepared -S -c ${CLIENTS} -j 2 -T ${SECONDS_RUN}"
${cmd} >"${WORK}/run" 2>&1
rc=$?
processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "${WORK}/run")
failures=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "${WORK}/run")
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "${WORK}/run")
aborted=$(grep -c 'aborted' "${WORK}/run")
ok=false
[ "${rc}" = 0 ] && [ "${failures:-x}" = 0 ] && [ "${aborted}" = 0 ] && [ "${processed:-0}" -gt 0 ] && ok=true
if [ "${ok}" = true ]; then
    report run true "${cmd}: ${processed} transactions, ${failures} failed, tps ${tps}"
else
    report run false "${cmd}: exit ${rc}, failed=${failures:-?}, aborted lines=${aborted}: $(grep -m3 -E 'error|abort|ERROR' "${WORK}/run" | tr '\n' ' ')"
fi
exit "${failed}"
