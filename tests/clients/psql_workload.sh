#!/usr/bin/env bash
# psql workload for the client compatibility matrix (tests/client_matrix.rs).
#
# psql 15 has no \bind, so it cannot use protocol-level prepared statements. In session
# mode the workload uses SQL PREPARE/EXECUTE (state that lives on the server connection,
# which session mode keeps for the client); in transaction mode only simple queries, since
# SQL-level prepared statements do not follow a client across server connections there.
# Connects with the PG* environment variables. Prints one JSON line per check; exits 1 if
# any check failed.
set -uo pipefail

PSQL="${PSQL:-psql}"
MODE="${POOL_MODE:?}"
TABLE="${CLIENT_TABLE:?}"
CONNS="${CLIENT_CONNS:-4}"
REPEAT=12
WORK=$(mktemp -d)
trap 'rm -rf "${WORK}"' EXIT
failed=0

report() {
    local check="$1" ok="$2" detail="$3"
    [ "${ok}" = true ] || failed=1
    detail=${detail//\\/\\\\}
    detail=${detail//\"/\\\"}
    detail=$(printf '%s' "${detail}" | tr '\n\t' '  ')
    printf '{"client":"psql","check":"%s","ok":%s,"detail":"%s"}\n' "${check}" "${ok}" "${detail}"
}

q() { "${PSQL}" -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }

version=$("${PSQL}" --version)
if ! q -c "CREATE TABLE ${TABLE} (id int PRIMARY KEY, note text)" >"${WORK}/create.err" 2>&1; then
    report connect false "$(cat "${WORK}/create.err")"
    exit 1
fi
report connect true "${version}"

# Several psql sessions at once, each running the same statement with new values.
for k in $(seq 0 $((CONNS - 1))); do
    {
        if [ "${MODE}" = session ]; then
            echo "PREPARE dbl(int) AS SELECT \$1 * 2, pg_backend_pid();"
            for i in $(seq 0 $((REPEAT - 1))); do
                echo "EXECUTE dbl($((k * 1000 + i)));"
                echo "SELECT pg_sleep(0.002);"
            done
            echo "DEALLOCATE dbl;"
        else
            for i in $(seq 0 $((REPEAT - 1))); do
                echo "SELECT $((k * 1000 + i)) * 2, pg_backend_pid();"
                echo "SELECT pg_sleep(0.002);"
            done
        fi
    } >"${WORK}/run${k}.sql"
    q -f "${WORK}/run${k}.sql" >"${WORK}/out${k}" 2>"${WORK}/err${k}" &
done
wait
ok=true
detail=""
counts=()
all_pids=()
for k in $(seq 0 $((CONNS - 1))); do
    want=$(for i in $(seq 0 $((REPEAT - 1))); do echo $(((k * 1000 + i) * 2)); done)
    got=$(grep '|' "${WORK}/out${k}" | cut -d'|' -f1)
    if [ "${got}" != "${want}" ]; then
        ok=false
        detail="session ${k}: wrong results or error: $(head -c 300 "${WORK}/err${k}")"
    fi
    pids=$(grep '|' "${WORK}/out${k}" | cut -d'|' -f2 | sort -u)
    counts+=("$(echo "${pids}" | grep -c .)")
    all_pids+=(${pids})
done
if [ "${MODE}" = session ]; then
    report prepared "${ok}" "${detail:-${CONNS} sessions x ${REPEAT} EXECUTE of a SQL PREPARE, values checked}"
    distinct=$(printf '%s\n' "${all_pids[@]}" | sort -u | grep -c .)
    pinned=true
    for c in "${counts[@]}"; do [ "${c}" = 1 ] || pinned=false; done
    [ "${distinct}" = "${CONNS}" ] || pinned=false
    report placement "${pinned}" "backends per connection [${counts[*]}], ${distinct} distinct"
else
    report repeated "${ok}" "${detail:-${CONNS} sessions x ${REPEAT} simple queries, values checked (no PREPARE: psql 15 has no \\bind)}"
    spread=false
    for c in "${counts[@]}"; do [ "${c}" -ge 2 ] && spread=true; done
    report placement "${spread}" "server backends seen per client connection: [${counts[*]}]"
fi

# ROLLBACK leaves no row behind.
q >"${WORK}/rb" 2>&1 <<EOF
BEGIN;
INSERT INTO ${TABLE} VALUES (1, 'rolled back');
ROLLBACK;
EOF
n=$(q -c "SELECT count(*) FROM ${TABLE} WHERE id = 1" 2>&1)
[ "${n}" = 0 ] && report rollback true "rows after ROLLBACK: ${n}" || report rollback false "rows after ROLLBACK: ${n} $(cat "${WORK}/rb")"

# An error inside a transaction: the transaction is aborted, ROLLBACK recovers the session.
"${PSQL}" -X -q -A -t -v VERBOSITY=verbose >"${WORK}/tx" 2>&1 <<EOF
BEGIN;
INSERT INTO ${TABLE} VALUES (2, 'doomed');
SELECT 1 / 0;
SELECT 1;
ROLLBACK;
SELECT 'usable' || (41 + 1);
EOF
first=$(grep -o 'ERROR:  [0-9A-Z]\{5\}' "${WORK}/tx" | sed -n 1p | cut -c9-)
second=$(grep -o 'ERROR:  [0-9A-Z]\{5\}' "${WORK}/tx" | sed -n 2p | cut -c9-)
usable=false
grep -qx 'usable42' "${WORK}/tx" && usable=true
n=$(q -c "SELECT count(*) FROM ${TABLE} WHERE id = 2" 2>&1)
ok=false
[ "${first}" = 22012 ] && [ "${second}" = 25P02 ] && [ "${usable}" = true ] && [ "${n}" = 0 ] && ok=true
report error_in_tx "${ok}" "${first:-none} then ${second:-none}, ROLLBACK, usable=${usable}, rows=${n}"

# COPY in (\copy from a file: COPY FROM STDIN on the wire) and out.
for i in $(seq 0 199); do printf '%d\tline %d\n' $((100 + i)) "${i}"; done >"${WORK}/copy.in"
if q -c "\\copy ${TABLE} (id, note) FROM '${WORK}/copy.in'" >"${WORK}/copy.err" 2>&1 &&
    q -c "\\copy (SELECT id, note FROM ${TABLE} WHERE id >= 100 ORDER BY id) TO '${WORK}/copy.out'" >>"${WORK}/copy.err" 2>&1 &&
    cmp -s "${WORK}/copy.in" "${WORK}/copy.out"; then
    report copy true "200 rows in, $(wc -l <"${WORK}/copy.out") out (\\copy)"
else
    report copy false "$(head -c 300 "${WORK}/copy.err")"
fi

# Cancel as a person does it: Ctrl-C at an interactive psql (on a pseudo-terminal from
# script(1)) sends a CancelRequest; the same session then runs the next statement. A psql
# reading a script file would exit on SIGINT instead.
marker="cancel_${TABLE}"
is_running() {
    local n
    n=$(q -c "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() AND strpos(query, '${marker}' || ' */') > 0" 2>/dev/null)
    [ "${n:-0}" -gt 0 ]
}
{
    echo "SELECT pg_sleep(20) /* ${marker} */;"
    started=false
    for _ in $(seq 1 200); do
        is_running && { started=true; break; }
        sleep 0.05
    done
    date +%s%N >"${WORK}/cancel.start"
    [ "${started}" = true ] && printf '\003'
    # Ctrl-C is answered by the server's error; wait for it before typing on.
    for _ in $(seq 1 300); do
        grep -q 'ERROR' "${WORK}/cancel" 2>/dev/null && break
        sleep 0.05
    done
    date +%s%N >"${WORK}/cancel.end"
    echo "SELECT 'al' || 'ive';"
    echo '\q'
} | timeout 40 script -qfec "${PSQL} -X -n -A -t -P pager=off -v VERBOSITY=verbose" /dev/null >"${WORK}/cancel" 2>&1
tr -d '\r' <"${WORK}/cancel" >"${WORK}/cancel.txt"
code=$(grep -o 'ERROR:  [0-9A-Z]\{5\}' "${WORK}/cancel.txt" | sed -n 1p | cut -c9-)
usable=false
grep -q '^alive$' "${WORK}/cancel.txt" && usable=true
took_ms=$((($(cat "${WORK}/cancel.end") - $(cat "${WORK}/cancel.start")) / 1000000))
ok=false
[ "${code}" = 57014 ] && [ "${usable}" = true ] && ok=true
report cancel "${ok}" "SQLSTATE ${code:-none} after ${took_ms} ms, usable=${usable} (Ctrl-C on a pty)"

q -c "DROP TABLE ${TABLE}" >/dev/null 2>&1
exit "${failed}"
