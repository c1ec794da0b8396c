"""asyncpg workload for the client compatibility matrix (tests/client_matrix.rs).

Connects with the PG* environment variables and default settings: every query goes
through asyncpg's statement cache (statement_cache_size=100), i.e. a server-side named
statement prepared once per connection and reused. Prints one JSON line per check; exits
1 if any check failed.
"""

import asyncio
import json
import os
import sys
import time

import asyncpg

CLIENT = "asyncpg"
MODE = os.environ["POOL_MODE"]
TABLE = os.environ["CLIENT_TABLE"]
CONNS = int(os.environ.get("CLIENT_CONNS", "4"))
REPEAT = 12
failed = False


def report(check, ok, detail):
    global failed
    failed |= not ok
    print(json.dumps({"client": CLIENT, "check": check, "ok": ok, "detail": detail}), flush=True)


async def connect():
    return await asyncpg.connect(timeout=10)


async def prepared(conns):
    async def worker(k, conn):
        pids = set()
        for i in range(REPEAT):
            n = k * 1000 + i
            row = await conn.fetchrow("SELECT $1::int * 2 AS v, pg_backend_pid() AS pid", n)
            if row["v"] != n * 2:
                raise AssertionError(f"connection {k} run {i}: got {row['v']}, want {n * 2}")
            pids.add(row["pid"])
            await asyncio.sleep(0.002)
        stmt = await conn.prepare("SELECT upper($1::text)")
        for i in range(REPEAT):
            if await stmt.fetchval(f"c{k}x{i}") != f"C{k}X{i}":
                raise AssertionError("explicitly prepared statement returned a wrong value")
        return pids

    per_conn = await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    report("prepared", True, f"{CONNS} connections x {REPEAT} cached + {REPEAT} explicit "
           "executions, values checked")
    counts = [len(p) for p in per_conn]
    if MODE == "transaction":
        report("placement", max(counts) >= 2, f"server backends seen per client connection: {counts}")
    else:
        distinct = len(set().union(*per_conn))
        ok = all(c == 1 for c in counts) and distinct == len(per_conn)
        report("placement", ok, f"backends per connection {counts}, {distinct} distinct")


async def count_rows(conn, lo, hi):
    return await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id BETWEEN $1 AND $2", lo, hi)


async def rollback(conn, other):
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"INSERT INTO {TABLE} (id, note) VALUES ($1, $2)", 1, "rolled back")
    await tr.rollback()
    n = await count_rows(other, 1, 1)
    report("rollback", n == 0, f"rows after ROLLBACK: {n}")


async def error_in_tx(conn, other):
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"INSERT INTO {TABLE} (id, note) VALUES ($1, $2)", 2, "doomed")
    try:
        await conn.fetchval("SELECT 1 / $1::int", 0)
        report("error_in_tx", False, "division by zero did not fail")
        return
    except asyncpg.DivisionByZeroError:
        pass
    try:
        await conn.fetchval("SELECT 1")
        report("error_in_tx", False, "aborted transaction accepted a statement")
        return
    except asyncpg.InFailedSQLTransactionError:
        pass
    await tr.rollback()
    ok = await conn.fetchval("SELECT 41 + $1::int", 1) == 42
    n = await count_rows(other, 2, 2)
    report("error_in_tx", ok and n == 0, f"22012 then 25P02, ROLLBACK, usable={ok}, rows={n}")


async def copy(conn):
    rows = [(100 + i, f"line {i}\twith tab") for i in range(200)]
    await conn.copy_records_to_table(TABLE, records=rows, columns=["id", "note"])
    got = []

    class Sink:
        def __init__(self):
            self.data = b""

        async def write(self, chunk):
            self.data += chunk

    sink = Sink()
    await conn.copy_from_query(
        f"SELECT id, note FROM {TABLE} WHERE id >= 100 ORDER BY id", output=sink.write, format="csv"
    )
    for line in sink.data.decode().splitlines():
        i, note = line.split(",", 1)
        got.append((int(i), note))
    report("copy", got == rows, f"{len(rows)} rows in (binary COPY), {len(got)} out (csv)")


async def cancel(conn, watcher):
    """asyncpg's cancel API is the call's timeout (or cancelling its task): it sends a
    CancelRequest and waits for the server to abort the statement. The server's 57014
    is consumed by asyncpg, so the test checks that the backend really stopped."""
    marker = f"cancel_{TABLE}"
    start = time.monotonic()
    try:
        await conn.execute(f"SELECT pg_sleep(20) /* {marker} */", timeout=1.0)
        report("cancel", False, "the sleep finished without being cancelled")
        return
    except asyncio.TimeoutError:
        pass
    took = time.monotonic() - start
    # The backend must stop soon; a missed cancel would leave it sleeping for 20 s.
    deadline = time.monotonic() + 5
    while True:
        running = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
            marker,
        )
        if running == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    alive = await conn.fetchval("SELECT 'alive'") == "alive"
    ok = running == 0 and alive and took < 10
    report("cancel", ok, f"timeout after {took:.3f}s, sleeps still running: {running}, "
           f"usable={alive} (asyncpg hides the server's 57014)")


async def main():
    conns = [await connect() for _ in range(CONNS)]
    report("connect", True, f"{CONNS} connections, asyncpg {asyncpg.__version__}")
    await conns[0].execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, note text)")
    tx = await connect()
    checks = [
        ("prepared", lambda: prepared(conns)),
        ("rollback", lambda: rollback(tx, conns[1])),
        ("error_in_tx", lambda: error_in_tx(tx, conns[1])),
        ("copy", lambda: copy(conns[2])),
        ("cancel", lambda: cancel(conns[3], conns[0])),
    ]
    for name, run in checks:
        try:
            await asyncio.wait_for(run(), 60)
        except Exception as e:  # noqa: BLE001 - every failure is a reported result
            report(name, False, f"{type(e).__name__}: {e}")
    await conns[0].execute(f"DROP TABLE {TABLE}")
    for c in conns + [tx]:
        await c.close()


asyncio.run(main())
sys.exit(1 if failed else 0)
