"""psycopg 3 workload for the client compatibility matrix (tests/client_matrix.rs).

Connects with the PG* environment variables and default settings (prepare_threshold=5:
a query executed more than five times on a connection becomes a server-side named
statement). Prints one JSON line per check; exits 1 if any check failed.
"""

import asyncio
import json
import os
import sys
import time

import psycopg
from psycopg import errors

CLIENT = "psycopg"
MODE = os.environ["POOL_MODE"]
TABLE = os.environ["CLIENT_TABLE"]
CONNS = int(os.environ.get("CLIENT_CONNS", "4"))
REPEAT = 12
failed = False


def report(check, ok, detail):
    global failed
    failed |= not ok
    print(json.dumps({"client": CLIENT, "check": check, "ok": ok, "detail": detail}), flush=True)


async def connect(autocommit=True):
    return await psycopg.AsyncConnection.connect("", autocommit=autocommit, connect_timeout=10)


async def count_rows(conn, lo, hi):
    cur = await conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id BETWEEN %s AND %s", (lo, hi))
    return (await cur.fetchone())[0]


async def prepared(conns):
    """The same statement, over and over with new parameters, on every connection at once."""

    async def worker(k, conn):
        pids = set()
        for i in range(REPEAT):
            n = k * 1000 + i
            cur = await conn.execute("SELECT %s::int * 2, pg_backend_pid()", (n,))
            got, pid = await cur.fetchone()
            if got != n * 2:
                raise AssertionError(f"connection {k} run {i}: got {got}, want {n * 2}")
            pids.add(pid)
            await asyncio.sleep(0.002)
        # An explicitly prepared statement too, with a text parameter.
        cur = await conn.execute("SELECT upper(%s::text)", (f"c{k}",), prepare=True)
        if (await cur.fetchone())[0] != f"C{k}":
            raise AssertionError("explicitly prepared statement returned a wrong value")
        return pids

    per_conn = await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    report("prepared", True, f"{CONNS} connections x {REPEAT} executions, values checked")
    placement(per_conn)


def placement(per_conn):
    """Transaction mode must spread a connection's statements over server connections;
    session mode must pin each client connection to one."""
    counts = [len(p) for p in per_conn]
    if MODE == "transaction":
        ok = max(counts) >= 2
        report("placement", ok, f"server backends seen per client connection: {counts}")
    else:
        distinct = len(set().union(*per_conn))
        ok = all(c == 1 for c in counts) and distinct == len(per_conn)
        report("placement", ok, f"backends per connection {counts}, {distinct} distinct")


async def rollback(conn, other):
    await conn.execute(f"INSERT INTO {TABLE} (id, note) VALUES (%s, %s)", (1, "rolled back"))
    await conn.rollback()
    n = await count_rows(other, 1, 1)
    report("rollback", n == 0, f"rows after ROLLBACK: {n}")


async def error_in_tx(conn, other):
    await conn.execute(f"INSERT INTO {TABLE} (id, note) VALUES (%s, %s)", (2, "doomed"))
    try:
        await conn.execute("SELECT 1 / 0")
        report("error_in_tx", False, "division by zero did not fail")
        return
    except errors.DivisionByZero:
        pass
    try:
        await conn.execute("SELECT 1")
        report("error_in_tx", False, "aborted transaction accepted a statement")
        return
    except errors.InFailedSqlTransaction:
        pass
    await conn.rollback()
    cur = await conn.execute("SELECT 41 + 1")
    ok = (await cur.fetchone())[0] == 42
    await conn.commit()
    n = await count_rows(other, 2, 2)
    report("error_in_tx", ok and n == 0, f"22012 then 25P02, ROLLBACK, usable={ok}, rows={n}")


async def copy(conn):
    rows = [(100 + i, f"line {i}\twith tab") for i in range(200)]
    async with conn.cursor() as cur:
        async with cur.copy(f"COPY {TABLE} (id, note) FROM STDIN") as cp:
            for r in rows:
                await cp.write_row(r)
        got = []
        async with cur.copy(
            f"COPY (SELECT id, note FROM {TABLE} WHERE id >= 100 ORDER BY id) TO STDOUT"
        ) as cp:
            cp.set_types(["int4", "text"])
            async for r in cp.rows():
                got.append(tuple(r))
    report("copy", got == rows, f"{len(rows)} rows in, {len(got)} out")


async def cancel(conn, watcher):
    marker = f"cancel_{TABLE}"
    task = asyncio.create_task(conn.execute(f"SELECT pg_sleep(20) /* {marker} */"))
    deadline = time.monotonic() + 10
    while True:
        cur = await watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND strpos(query, %s) > 0",
            (marker,),
        )
        if (await cur.fetchone())[0] > 0:
            break
        if time.monotonic() > deadline:
            report("cancel", False, "the sleep never started")
            task.cancel()
            return
        await asyncio.sleep(0.05)
    start = time.monotonic()
    await conn.cancel_safe()
    try:
        await asyncio.wait_for(task, 15)
        report("cancel", False, "the sleep finished without being cancelled")
        return
    except errors.QueryCanceled as e:
        code = e.sqlstate
    took = time.monotonic() - start
    cur = await conn.execute("SELECT 'alive'")
    alive = (await cur.fetchone())[0] == "alive"
    report("cancel", code == "57014" and alive, f"SQLSTATE {code} after {took:.3f}s, usable={alive}")


async def main():
    conns = [await connect() for _ in range(CONNS)]
    report("connect", True, f"{CONNS} connections, psycopg {psycopg.__version__}, "
           f"libpq {psycopg.pq.version()}")
    await conns[0].execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, note text)")
    tx = await connect(autocommit=False)
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
