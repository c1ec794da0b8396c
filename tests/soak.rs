//! Soak: mixed load through the proxy process (simple queries, transactions, prepared
//! statements, COPY in and out) with clients killed at random points and the upstream
//! restarted (fast and immediate stops), then a leak check of the proxy's descriptors, memory,
//! client and server connections, and of the database's data and sessions.
//!
//! Not part of the normal run:
//! `PGSLUICE_SOAK_SECS=600 cargo test --test soak -- --ignored --nocapture`
//! (default 20 s; nextest ends tests after 180 s; `PGSLUICE_SOAK_SEED` repeats a run's
//! random choices). Each client talks through its own recording relay: a client that gets
//! an answer not belonging to its request has its last protocol messages printed, with the
//! restarts and the proxy's log lines for its session.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::recorder::Recorder;
use common::{LogOpts, ProxyProcess, TempPostgres};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, Statement};

const WORKERS: usize = 8;
const POOL: usize = 4;
/// Longest any single operation may take; beyond it the proxy is considered hung.
const STALL: Duration = Duration::from_secs(15);

/// Errors a client may see while the upstream restarts or the guard sheds; all documented.
const EXPECTED: &[&str] = &[
    "08006", // lost connection to upstream
    "57P01", // PostgreSQL: terminating connection due to administrator command (fast stop)
    "57P02", // PostgreSQL: crash of another server process (immediate stop)
    "57P03", // circuit open / PostgreSQL starting up or shutting down
    "53400", // shed: the query never ran
    "closed",
];

/// Out-of-step answers explained in full at the end, at most.
const INCIDENTS: usize = 12;

/// A client that got an answer not belonging to its request: what it saw.
struct Incident {
    worker: usize,
    what: String,
    /// The relay's address towards the proxy (the proxy logs it as the session's peer).
    peer: Option<std::net::SocketAddr>,
    transcript: String,
}

#[derive(Default)]
struct Stats {
    ops: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    wrong: AtomicU64,
    stalls: AtomicU64,
    kills: AtomicU64,
    tags: AtomicU64,
    incidents: Mutex<Vec<Incident>>,
    /// Upstream restarts: (start, end, kind), relative to the soak's start.
    restarts: Mutex<Vec<(Duration, Duration, &'static str)>>,
}

impl Stats {
    fn ok(&self, op: &'static str) {
        *self.ops.lock().unwrap().entry(op).or_default() += 1;
    }

    /// Keeps the client's transcript; a moment later, so the answer that surprised the
    /// client has been recorded too (the relay forwards first, records after).
    async fn incident(&self, worker: usize, what: String, rec: &Recorder) {
        if self.incidents.lock().unwrap().len() >= INCIDENTS {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(t) = rec.current() else { return };
        self.incidents.lock().unwrap().push(Incident {
            worker,
            what,
            peer: t.proxy_side(),
            transcript: t.render(),
        });
    }

    /// Counts an error; true when it is none of the documented kinds.
    fn err(&self, op: &'static str, e: &tokio_postgres::Error) -> bool {
        let class = match e.code() {
            Some(c) => c.code().to_string(),
            None if e.is_closed() => "closed".into(),
            None => {
                let text = e.to_string();
                // "error communicating with the server: Connection reset by peer" and the like.
                if text.contains("communicating") || text.contains("connection closed") {
                    "closed".into()
                } else {
                    format!("other: {text}")
                }
            }
        };
        *self
            .errors
            .lock()
            .unwrap()
            .entry(format!("{class} ({op})"))
            .or_default() += 1;
        class.starts_with("other")
    }
}

struct Conn {
    client: Client,
    driver: JoinHandle<()>,
    plus_one: Option<Statement>,
}

impl Conn {
    async fn open(url: &str) -> Result<Conn, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            client,
            driver,
            plus_one: None,
        })
    }

    /// Drops the socket without Terminate, whatever is in flight.
    fn kill(self) {
        self.driver.abort();
    }
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// The value carries the worker's number, so a wrong answer tells whose query it answered.
async fn op_simple(c: &Conn, rng: &mut StdRng, worker: usize, stats: &Stats) -> PgResult<bool> {
    let n = worker as i64 * 1_000_000 + rng.gen_range(1..1_000_000);
    let rows = c.client.simple_query(&format!("SELECT {n} * 2")).await?;
    let got = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    if got == Some((n * 2).to_string()) {
        return Ok(true);
    }
    let from = match got.as_deref().and_then(|g| g.parse::<i64>().ok()) {
        Some(v) if v % 2 == 0 && v / 2_000_000 == worker as i64 => "own".to_string(),
        Some(v) if v % 2 == 0 => format!("worker {}", v / 2_000_000),
        _ => format!("{got:?}"),
    };
    *stats
        .errors
        .lock()
        .unwrap()
        .entry(format!("wrong result (simple) from {from}"))
        .or_default() += 1;
    Ok(false)
}

/// A named statement prepared once per connection and reused across upstream restarts.
async fn op_prepared(c: &mut Conn, rng: &mut StdRng) -> PgResult<bool> {
    if c.plus_one.is_none() {
        c.plus_one = Some(c.client.prepare("SELECT $1::int8 + 1").await?);
    }
    let st = c.plus_one.clone().unwrap();
    let n: i64 = rng.gen_range(0..1_000_000_000);
    let row = c.client.query_one(&st, &[&n]).await?;
    Ok(row.get::<_, i64>(0) == n + 1)
}

async fn op_transaction(c: &Conn, tag: i64) -> PgResult<bool> {
    let insert = "INSERT INTO soak_tx(tag, part) VALUES ($1, $2)";
    c.client.batch_execute("BEGIN").await?;
    let body = async {
        c.client.execute(insert, &[&tag, &1i32]).await?;
        c.client.execute(insert, &[&tag, &2i32]).await?;
        c.client.batch_execute("COMMIT").await
    };
    if let Err(e) = body.await {
        let _ = c.client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    Ok(true)
}

async fn op_copy_in(c: &Conn, tag: i64, rows: usize) -> PgResult<bool> {
    use futures::SinkExt;
    let sink = c
        .client
        .copy_in::<_, bytes::Bytes>("COPY soak_copy(tag, n) FROM STDIN")
        .await?;
    futures::pin_mut!(sink);
    for chunk in 0..4 {
        let text: String = (0..rows / 4)
            .map(|i| format!("{tag}\t{}\n", chunk * rows + i))
            .collect();
        sink.send(bytes::Bytes::from(text)).await?;
    }
    Ok(sink.finish().await? == (rows / 4 * 4) as u64)
}

async fn op_copy_out(c: &Conn) -> PgResult<bool> {
    use futures::StreamExt;
    let stream = c
        .client
        .copy_out("COPY (SELECT generate_series(1, 500)) TO STDOUT")
        .await?;
    futures::pin_mut!(stream);
    let mut lines = 0;
    while let Some(chunk) = stream.next().await {
        lines += chunk?.iter().filter(|&&b| b == b'\n').count();
    }
    Ok(lines == 500)
}

/// Starts something (a long query, an open transaction or a COPY), then drops the socket
/// at a random moment, without Terminate.
async fn kill_mid_work(c: Conn, rng: &mut StdRng, tag: i64) {
    let kind = rng.gen_range(0..3);
    let after = Duration::from_millis(rng.gen_range(10..300));
    let client = &c.client;
    let work = async {
        match kind {
            0 => {
                let _ = client.simple_query("SELECT pg_sleep(2)").await;
            }
            1 => {
                let insert = "INSERT INTO soak_tx(tag, part) VALUES ($1, 1)";
                if client.batch_execute("BEGIN").await.is_ok() {
                    let _ = client.execute(insert, &[&tag]).await;
                }
            }
            _ => {
                use futures::SinkExt;
                let copy = "COPY soak_copy(tag, n) FROM STDIN";
                if let Ok(sink) = client.copy_in::<_, bytes::Bytes>(copy).await {
                    futures::pin_mut!(sink);
                    let _ = sink.send(bytes::Bytes::from(format!("{tag}\t1\n"))).await;
                }
            }
        }
        // Whatever was started stays open until the socket goes.
        std::future::pending::<()>().await
    };
    let _ = tokio::time::timeout(after, work).await;
    c.kill();
}

async fn worker(rec: Recorder, deadline: Instant, stats: Arc<Stats>, seed: u64, worker_no: usize) {
    let url = format!(
        "postgres://postgres@{}/postgres?connect_timeout=10",
        rec.addr()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match tokio::time::timeout(STALL, Conn::open(&url)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    stats.err("connect", &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    stats.stalls.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        let tag = stats.tags.fetch_add(1, Ordering::Relaxed) as i64;
        let pick = rng.gen_range(0..100);
        if pick >= 97 {
            stats.kills.fetch_add(1, Ordering::Relaxed);
            kill_mid_work(c, &mut rng, tag).await;
            continue;
        }
        let (name, res) = {
            let fut = async {
                match pick {
                    0..=34 => ("simple", op_simple(&c, &mut rng, worker_no, &stats).await),
                    35..=59 => ("prepared", op_prepared(&mut c, &mut rng).await),
                    60..=79 => ("transaction", op_transaction(&c, tag).await),
                    80..=89 => ("copy_in", op_copy_in(&c, tag, 200).await),
                    _ => ("copy_out", op_copy_out(&c).await),
                }
            };
            match tokio::time::timeout(STALL, fut).await {
                Ok(r) => r,
                Err(_) => {
                    stats.stalls.fetch_add(1, Ordering::Relaxed);
                    c.kill();
                    continue;
                }
            }
        };
        match res {
            Ok(true) => stats.ok(name),
            Ok(false) => {
                stats.wrong.fetch_add(1, Ordering::Relaxed);
                *stats
                    .errors
                    .lock()
                    .unwrap()
                    .entry(format!("wrong result ({name})"))
                    .or_default() += 1;
                stats
                    .incident(worker_no, format!("wrong result ({name})"), &rec)
                    .await;
                // A connection that answered the wrong request is not to be trusted again.
                c.kill();
                continue;
            }
            Err(e) => {
                if stats.err(name, &e) {
                    stats
                        .incident(worker_no, format!("{name}: {e}"), &rec)
                        .await;
                }
                if c.client.is_closed() {
                    c.kill();
                    continue;
                }
                // A prepared statement from before a failure is still valid; keep it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        conn = Some(c);
    }
    if let Some(c) = conn {
        c.kill();
    }
}

/// Restarts the upstream at random intervals around `period`, alternating fast and immediate
/// stops; returns (restarts, longest downtime).
async fn chaos(
    pg: Arc<TempPostgres>,
    deadline: Instant,
    period: Duration,
    seed: u64,
    t0: Instant,
    stats: Arc<Stats>,
) -> (u32, Duration) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (mut n, mut worst) = (0u32, Duration::ZERO);
    loop {
        let wait = period.mul_f64(rng.gen_range(0.5..1.5));
        if Instant::now() + wait + Duration::from_secs(2) >= deadline {
            return (n, worst);
        }
        tokio::time::sleep(wait).await;
        let immediate = n % 2 == 1;
        let pg = pg.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            if immediate {
                pg.kill_immediate();
            } else {
                pg.stop();
            }
            pg.start();
        })
        .await
        .expect("restart upstream");
        let kind = if immediate { "immediate" } else { "fast" };
        stats
            .restarts
            .lock()
            .unwrap()
            .push((t - t0, t0.elapsed(), kind));
        worst = worst.max(t.elapsed());
        n += 1;
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    clients: u64,
    servers: u64,
}

async fn sample(proxy: &ProxyProcess, t0: Instant) -> Sample {
    let pools = proxy.pools().await;
    let servers = pools["pools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["server_connections"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    Sample {
        at: t0.elapsed(),
        rss_kib: proxy.rss_kib(),
        fds: proxy.open_fds(),
        clients: pools["clients"]["total"].as_u64().unwrap_or(u64::MAX),
        servers,
    }
}

/// Each out-of-step client's transcript, the restarts around it and the proxy's log lines
/// for its session.
fn report_incidents(stats: &Stats, proxy: &ProxyProcess, wall0: &str) {
    let incidents = stats.incidents.lock().unwrap();
    if incidents.is_empty() {
        return;
    }
    eprintln!("soak: times below are seconds since {wall0} (the proxy logs wall-clock UTC)");
    for (at, done, kind) in stats.restarts.lock().unwrap().iter() {
        eprintln!(
            "soak: restart ({kind}) {:.3}s .. {:.3}s",
            at.as_secs_f64(),
            done.as_secs_f64()
        );
    }
    for (n, inc) in incidents.iter().enumerate() {
        eprintln!(
            "soak: incident {n}: worker {}: {}; proxy sees the client as {:?}",
            inc.worker, inc.what, inc.peer
        );
        eprint!("{}", inc.transcript);
        if let Some(peer) = inc.peer {
            let lines = proxy.log_lines_with(&format!("peer={peer}"));
            eprintln!("  proxy log lines for peer={peer}: {}", lines.len());
            for l in lines.iter().rev().take(60).rev() {
                eprintln!("    {l}");
            }
        }
    }
}

fn secs_from_env() -> u64 {
    std::env::var("PGSLUICE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .clamp(5, 3_600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: set PGSLUICE_SOAK_SECS and run with --run-ignored all"]
async fn soak_mixed_load_with_kills_and_restarts() {
    common::raise_fd_limit();
    let secs = secs_from_env();
    let seed: u64 = std::env::var("PGSLUICE_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let pg = Arc::new(common::cluster().await);
    let out = pg.psql(&[
        "-c",
        "CREATE TABLE soak_tx(tag int8, part int4); CREATE TABLE soak_copy(tag int8, n int4)",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = POOL.to_string();
    // Debug lines of the session explain an incident; they are few per query.
    let proxy = ProxyProcess::start_logged(
        &pg.url(),
        &[
            "--pool-size",
            &pool,
            "--max-active",
            &pool,
            "--queue-timeout",
            "2s",
            "--connect-timeout",
            "1s",
            "--health-interval",
            "200ms",
            "--cancel-grace",
            "1s",
            "--breaker-cooldown",
            "200ms",
            "--breaker-max-cooldown",
            "1s",
        ],
        LogOpts {
            filter: "info,pgsluice=debug",
            keep: 200_000,
        },
    )
    .await;
    let t0 = Instant::now();
    let wall0 = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let start = sample(&proxy, t0).await;
    let metrics_start = (
        proxy.metric_sum("pgsluice_client_connections", "").await,
        proxy.metric_sum("pgsluice_server_connections", "").await,
    );

    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        // One recorder per worker: its newest connection is the worker's current one.
        let rec = Recorder::start(proxy.addr(), t0).await;
        workers.push(tokio::spawn(worker(
            rec,
            deadline,
            stats.clone(),
            seed + i as u64,
            i,
        )));
    }
    // About one restart per 30 s in a long run; two or three in a short one.
    let period = Duration::from_secs((secs / 20).clamp(5, 30));
    let chaos = tokio::spawn(chaos(pg.clone(), deadline, period, seed, t0, stats.clone()));
    let mut series = vec![start];
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5).min(deadline - Instant::now())).await;
        series.push(sample(&proxy, t0).await);
    }
    for w in workers {
        w.await.expect("worker panicked");
    }
    let (restarts, worst_restart) = chaos.await.unwrap();

    // Settle: every client gone, the pool back to idle connections.
    let t_settle = Instant::now();
    let end = loop {
        let s = sample(&proxy, t0).await;
        if s.clients == 0 || t_settle.elapsed() > Duration::from_secs(15) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Gauges are published on the health-check interval; give them a few rounds.
    let mut metrics_end = (f64::NAN, f64::NAN);
    for _ in 0..25 {
        metrics_end = (
            proxy.metric_sum("pgsluice_client_connections", "").await,
            proxy.metric_sum("pgsluice_server_connections", "").await,
        );
        if metrics_end.0 == 0.0 && metrics_end.1 == end.servers as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db = pg.client().await;
    let backends: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let idle_in_tx: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let torn_tx: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT tag FROM soak_tx GROUP BY tag HAVING count(*) <> 2) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let torn_copy: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT tag FROM soak_copy GROUP BY tag HAVING count(*) <> 200) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let ops = stats.ops.lock().unwrap().clone();
    let errors = stats.errors.lock().unwrap().clone();
    let peak_rss = series.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_fds = series.iter().map(|s| s.fds).max().unwrap_or(0);
    eprintln!("soak: {secs} s, seed {seed}, {WORKERS} workers, pool {POOL}");
    eprintln!(
        "soak: upstream restarts {restarts} (longest {worst_restart:?}), client kills {}",
        stats.kills.load(Ordering::Relaxed)
    );
    eprintln!("soak: ok ops {ops:?} (total {})", ops.values().sum::<u64>());
    eprintln!("soak: errors {errors:?}");
    eprintln!(
        "soak: wrong results {}, stalls {}; torn transactions {torn_tx}, torn copies {torn_copy}",
        stats.wrong.load(Ordering::Relaxed),
        stats.stalls.load(Ordering::Relaxed)
    );
    eprintln!("soak: start {start:?}");
    eprintln!("soak: end   {end:?} (settled in {:?})", t_settle.elapsed());
    eprintln!("soak: peak RSS {peak_rss} KiB, peak fds {peak_fds}");
    eprintln!(
        "soak: metrics client/server connections start {metrics_start:?} end {metrics_end:?}; \
         database client backends {backends}, idle in transaction {idle_in_tx}"
    );
    report_incidents(&stats, &proxy, &wall0);
    for s in &series {
        eprintln!(
            "soak: t={:>4}s RSS {} KiB, fds {}, clients {}, server connections {}",
            s.at.as_secs(),
            s.rss_kib,
            s.fds,
            s.clients,
            s.servers
        );
    }

    assert_eq!(stats.wrong.load(Ordering::Relaxed), 0, "wrong results");
    assert_eq!(
        stats.stalls.load(Ordering::Relaxed),
        0,
        "operations hung past {STALL:?}"
    );
    let unexpected: Vec<_> = errors
        .iter()
        .filter(|(k, _)| !EXPECTED.iter().any(|e| k.starts_with(e)))
        .collect();
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:?}");
    for op in ["simple", "prepared", "transaction", "copy_in", "copy_out"] {
        assert!(ops.get(op).copied().unwrap_or(0) > 0, "no {op} succeeded");
    }
    assert!(restarts >= 1, "the upstream was never restarted");
    assert_eq!(
        (torn_tx, torn_copy),
        (0, 0),
        "partial transactions or COPYs persisted"
    );
    assert_eq!(
        end.clients, 0,
        "client connections still counted after all left"
    );
    assert_eq!(metrics_end.0, 0.0, "client connection gauge after all left");
    assert!(
        end.servers <= POOL as u64,
        "server connections {} > pool {POOL}",
        end.servers
    );
    assert!(
        backends <= POOL as i64,
        "{backends} database sessions for a pool of {POOL}"
    );
    assert_eq!(
        idle_in_tx, 0,
        "a server connection was left inside a transaction"
    );
    // The start had no server connection open; each one at the end is one more descriptor.
    let fd_allow = start.fds + end.servers as usize + 2;
    assert!(
        end.fds <= fd_allow,
        "fds {} at start, {} at end",
        start.fds,
        end.fds
    );
    let rss_allow = start.rss_kib + 64 * 1024;
    assert!(
        end.rss_kib < rss_allow,
        "RSS {} KiB at start, {} KiB at end",
        start.rss_kib,
        end.rss_kib
    );
    assert!(
        proxy.terminate(Duration::from_secs(10)),
        "proxy did not stop cleanly"
    );
}
