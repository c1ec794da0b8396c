// node-postgres workload for the client compatibility matrix (tests/client_matrix.rs).
//
// Connects with the PG* environment variables and default settings: a query with
// parameters is sent as an unnamed extended-protocol statement unless it is given a
// `name`, in which case it is prepared once per connection and then only bound. Prints
// one JSON line per check; exits 1 if any check failed.
'use strict'

const pg = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')

const CLIENT = 'node-postgres'
const MODE = process.env.POOL_MODE
const TABLE = process.env.CLIENT_TABLE
const CONNS = parseInt(process.env.CLIENT_CONNS || '4', 10)
const REPEAT = 12
let failed = false

function report (check, ok, detail) {
  failed = failed || !ok
  console.log(JSON.stringify({ client: CLIENT, check, ok, detail }))
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function connect () {
  const c = new pg.Client({ connectionTimeoutMillis: 10000 })
  await c.connect()
  return c
}

async function countRows (conn, lo, hi) {
  const r = await conn.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id BETWEEN $1 AND $2`, [lo, hi])
  return r.rows[0].n
}

async function prepared (conns) {
  const perConn = await Promise.all(conns.map(async (conn, k) => {
    const pids = new Set()
    for (let i = 0; i < REPEAT; i++) {
      const n = k * 1000 + i
      const r = await conn.query({ name: 'double', text: 'SELECT $1::int * 2 AS v, pg_backend_pid() AS pid', values: [n] })
      if (r.rows[0].v !== n * 2) throw new Error(`connection ${k} run ${i}: got ${r.rows[0].v}, want ${n * 2}`)
      pids.add(r.rows[0].pid)
      // The same text unnamed: node's default for parameterised queries.
      const u = await conn.query('SELECT upper($1::text) AS u', [`c${k}x${i}`])
      if (u.rows[0].u !== `C${k}X${i}`) throw new Error('unnamed statement returned a wrong value')
      await sleep(2)
    }
    return pids
  }))
  report('prepared', true, `${CONNS} connections x ${REPEAT} named + ${REPEAT} unnamed executions, values checked`)
  const counts = perConn.map((p) => p.size)
  if (MODE === 'transaction') {
    report('placement', Math.max(...counts) >= 2, `server backends seen per client connection: ${JSON.stringify(counts)}`)
  } else {
    const distinct = new Set(perConn.flatMap((p) => [...p])).size
    const ok = counts.every((c) => c === 1) && distinct === perConn.length
    report('placement', ok, `backends per connection ${JSON.stringify(counts)}, ${distinct} distinct`)
  }
}

async function rollback (conn, other) {
  await conn.query('BEGIN')
  await conn.query(`INSERT INTO ${TABLE} (id, note) VALUES ($1, $2)`, [1, 'rolled back'])
  await conn.query('ROLLBACK')
  const n = await countRows(other, 1, 1)
  report('rollback', n === 0, `rows after ROLLBACK: ${n}`)
}

async function errorInTx (conn, other) {
  await conn.query('BEGIN')
  await conn.query(`INSERT INTO ${TABLE} (id, note) VALUES ($1, $2)`, [2, 'doomed'])
  const codeOf = async (sql, values) => {
    try {
      await conn.query(sql, values)
      return 'none'
    } catch (e) {
      return e.code
    }
  }
  const first = await codeOf('SELECT 1 / $1::int', [0])
  const second = await codeOf('SELECT 1')
  await conn.query('ROLLBACK')
  const r = await conn.query('SELECT 41 + $1::int AS v', [1])
  const usable = r.rows[0].v === 42
  const n = await countRows(other, 2, 2)
  const ok = first === '22012' && second === '25P02' && usable && n === 0
  report('error_in_tx', ok, `${first} then ${second}, ROLLBACK, usable=${usable}, rows=${n}`)
}

async function copy (conn) {
  const rows = []
  for (let i = 0; i < 200; i++) rows.push(`${100 + i}\tline ${i}\n`)
  await pipeline(Readable.from(rows), conn.query(copyFrom(`COPY ${TABLE} (id, note) FROM STDIN`)))
  const chunks = []
  const sink = new Writable({
    write (chunk, _enc, cb) {
      chunks.push(chunk)
      cb()
    }
  })
  await pipeline(conn.query(copyTo(`COPY (SELECT id, note FROM ${TABLE} WHERE id >= 100 ORDER BY id) TO STDOUT`)), sink)
  const out = Buffer.concat(chunks).toString()
  report('copy', out === rows.join(''), `${rows.length} rows in, ${out.split('\n').length - 1} out (pg-copy-streams)`)
}

async function cancel (conn, watcher) {
  const marker = `cancel_${TABLE}`
  const query = new pg.Query(`SELECT pg_sleep(20) /* ${marker} */`)
  const outcome = new Promise((resolve) => {
    query.on('error', (e) => resolve(e.code))
    query.on('end', () => resolve('finished'))
  })
  conn.query(query)
  const deadline = Date.now() + 10000
  for (;;) {
    const r = await watcher.query(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' " +
      'AND pid <> pg_backend_pid() AND strpos(query, $1) > 0', [marker])
    if (r.rows[0].n > 0) break
    if (Date.now() > deadline) {
      report('cancel', false, 'the sleep never started')
      return
    }
    await sleep(50)
  }
  const start = Date.now()
  // node-postgres's cancel: a fresh Client sends a CancelRequest with the connection's key.
  new pg.Client().cancel(conn, query)
  const code = await Promise.race([outcome, sleep(15000).then(() => 'no answer')])
  const took = (Date.now() - start) / 1000
  const r = await conn.query("SELECT 'alive' AS a")
  const usable = r.rows[0].a === 'alive'
  report('cancel', code === '57014' && usable, `SQLSTATE ${code} after ${took.toFixed(3)}s, usable=${usable}`)
}

async function main () {
  const conns = []
  for (let i = 0; i < CONNS; i++) conns.push(await connect())
  report('connect', true, `${CONNS} connections, pg ${require('pg/package.json').version}, node ${process.version}`)
  await conns[0].query(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, note text)`)
  const tx = await connect()
  const checks = [
    ['prepared', () => prepared(conns)],
    ['rollback', () => rollback(tx, conns[1])],
    ['error_in_tx', () => errorInTx(tx, conns[1])],
    ['copy', () => copy(conns[2])],
    ['cancel', () => cancel(conns[3], conns[0])]
  ]
  for (const [name, run] of checks) {
    try {
      await Promise.race([run(), sleep(60000).then(() => { throw new Error('timed out after 60 s') })])
    } catch (e) {
      report(name, false, `${e.code || e.name}: ${e.message}`)
    }
  }
  await conns[0].query(`DROP TABLE ${TABLE}`)
  await Promise.all(conns.concat([tx]).map((c) => c.end()))
}

main().then(
  () => process.exit(failed ? 1 : 0),
  (e) => {
    report('fatal', false, `${e.code || e.name}: ${e.message}`)
    process.exit(1)
  }
)
