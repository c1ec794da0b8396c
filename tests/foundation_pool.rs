//! Pooling behaviour against a real PostgreSQL: connection caps, session state, cleanup after
//! client loss, upstream restarts, malformed startups and a pgbench run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use common::pg::client_program;
use common::proxy::TestProxy;
use common::{try_connect, TempPostgres};

async fn new_pg() -> TempPostgres {
    tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .expect("start postgres")
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_eight_connections() {
    five_hundred_clients(true).await;
}

/// The same load on the simple query protocol only (no prepared statements involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_simple_protocol_clients_share_eight_connections() {
    five_hundred_clients(false).await;
}

/// `x + 1` computed upstream. A shed (53400: the query never ran) is retried after a short
/// pause, as the error invites; the number of sheds is added to `sheds`.
async fn plus_one(
    c: &tokio_postgres::Client,
    x: i32,
    extended: bool,
    sheds: &AtomicI64,
) -> Result<i32, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0u64.. {
        match plus_one_once(c, x, extended).await {
            Err(e)
                if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED)
                    && Instant::now() < deadline =>
            {
                sheds.fetch_add(1, Ordering::Relaxed);
                let pause = 10 + (x as u64 * 7 + attempt * 13) % 90;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(e) => return Err(format!("{e:?}")),
            Ok(v) => return v,
        }
    }
    unreachable!("the retry loop only ends by returning")
}

async fn plus_one_once(
    c: &tokio_postgres::Client,
    x: i32,
    extended: bool,
) -> Result<Result<i32, String>, tokio_postgres::Error> {
    if extended {
        let row = c.query_one("SELECT $1::int + 1", &[&x]).await?;
        return Ok(Ok(row.get(0)));
    }
    let msgs = c.simple_query(&format!("SELECT {x} + 1")).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .ok_or_else(|| format!("no row in reply to SELECT {x} + 1")))
}

async fn five_hundred_clients(extended: bool) {
    const CLIENTS: usize = 500;
    common::raise_fd_limit();
    let pg = new_pg().await;
    let admin = pg.client().await;
    admin.batch_execute("CREATE ROLE app LOGIN").await.unwrap();
    let proxy = TestProxy::start(
        &pg,
        &[
            "--pool-size",
            "8",
            "--pool-mode",
            "transaction",
            "--queue-timeout",
            "20s",
        ],
    )
    .await;

    // Watch the upstream's view of the app role's backends for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));
    let monitor = tokio::spawn({
        let (stop, max_seen) = (stop.clone(), max_seen.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let n = count(
                    &admin,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE usename = 'app' AND backend_type = 'client backend'",
                )
                .await;
                max_seen.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let url = proxy.url_for("app", "postgres");
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let sheds = Arc::new(AtomicI64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (url, barrier, sheds) = (url.clone(), barrier.clone(), sheds.clone());
        tasks.spawn(async move {
            let c = try_connect(&url).await;
            // All clients hold a connection to the proxy at the same time; a failed one
            // still arrives so the others are not left waiting.
            barrier.wait().await;
            let c = c.map_err(|e| format!("client {i} connect: {e:?}"))?;
            for k in 0..3i32 {
                let x = i as i32 * 10 + k;
                let v = plus_one(&c, x, extended, &sheds)
                    .await
                    .map_err(|e| format!("client {i} query {k}: {e}"))?;
                if v != x + 1 {
                    return Err(format!("client {i}: got {v}, want {}", x + 1));
                }
            }
            Ok::<_, String>(())
        });
    }
    let run = async {
        let mut errors = Vec::new();
        let mut ok = 0;
        while let Some(res) = tasks.join_next().await {
            match res.expect("client task panicked") {
                Ok(()) => ok += 1,
                Err(e) => errors.push(e),
            }
        }
        (ok, errors)
    };
    let (ok, errors) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("clients did not finish within 60s");
    stop.store(true, Ordering::SeqCst);
    monitor.await.unwrap();

    assert!(
        errors.is_empty(),
        "{} failures, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(ok, CLIENTS);
    let max = max_seen.load(Ordering::SeqCst);
    eprintln!(
        "{CLIENTS} clients done; peak upstream backends {max}; {} shed and retried",
        sheds.load(Ordering::SeqCst)
    );
    assert!(max >= 1, "never saw an upstream backend for role app");
    assert!(
        max <= 8,
        "upstream saw {max} backends for role app, cap is 8"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_per_client() {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &["--pool-mode", "session", "--pool-size", "1"]).await;

    let a = proxy.client().await;
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    a.batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    for _ in 0..3 {
        let wm: String = a.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(wm, "7MB");
        let pid: i32 = a
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            pid, pid_a,
            "a session-mode client keeps its server connection"
        );
    }
    a.execute("INSERT INTO scratch VALUES (1)", &[])
        .await
        .unwrap();
    drop(a);

    // With one pooled connection, the next client most likely reuses the same backend:
    // whatever it gets, none of the previous session's state may leak into it.
    let b = tokio::time::timeout(Duration::from_secs(10), proxy.client())
        .await
        .expect("second client waited too long for the only server connection");
    let wm: String = b.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "4MB", "SET from the previous client leaked");
    let err = b.simple_query("SELECT * FROM scratch").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_open_transaction() {
    for mode in ["transaction", "session"] {
        let pg = new_pg().await;
        let direct = pg.client().await;
        direct
            .batch_execute("CREATE TABLE t (x int)")
            .await
            .unwrap();
        let proxy = TestProxy::start(&pg, &["--pool-mode", mode, "--pool-size", "2"]).await;

        let (client, conn) = tokio_postgres::connect(&proxy.url(), NoTls).await.unwrap();
        let conn_task = tokio::spawn(conn);
        client
            .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        let idle_in_tx = "SELECT count(*) FROM pg_stat_activity \
                          WHERE state LIKE 'idle in transaction%'";
        assert_eq!(
            count(&direct, idle_in_tx).await,
            1,
            "{mode}: transaction open upstream"
        );

        // Vanish without a Terminate message, as a crashed client would.
        conn_task.abort();
        let _ = conn_task.await;
        drop(client);

        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = count(&direct, idle_in_tx).await;
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: {open} transaction(s) still open 5s after the client left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count(&direct, "SELECT count(*) FROM t").await, 0, "{mode}");
        // The pool still serves new clients.
        let c = proxy.client().await;
        assert_eq!(count(&c, "SELECT count(*) FROM t").await, 0, "{mode}");
    }
}

/// Retries `SELECT 1` on fresh connections until it works or ~10 s pass.
async fn wait_until_proxy_serves(proxy: &TestProxy) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match try_connect(&proxy.url()).await {
            Ok(c) => match c.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("query: {e}"),
            },
            Err(e) => last = format!("connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_and_crash() {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4"]).await;
    let c = proxy.client().await;
    c.simple_query("SELECT 1").await.unwrap();

    // Clean restart while the pool holds idle server connections.
    tokio::task::block_in_place(|| pg.restart());
    if let Err(e) = wait_until_proxy_serves(&proxy).await {
        panic!("no service 10s after restart: {e}\n{}", pg.log_tail());
    }

    // Crash while a query runs: the client learns its query was lost.
    let busy = proxy.client().await;
    let in_flight = tokio::spawn(async move {
        let res = busy.simple_query("SELECT pg_sleep(30)").await;
        (busy, res)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| pg.kill_immediate());
    let (busy, res) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight query still hanging 10s after the crash")
        .unwrap();
    let err = res.expect_err("query cannot succeed when the server crashed");
    assert!(
        err.code() == Some(&SqlState::CONNECTION_FAILURE) || err.is_closed(),
        "want 08006 or a closed connection, got {err:?}"
    );

    tokio::task::block_in_place(|| pg.start());
    if let Err(e) = wait_until_proxy_serves(&proxy).await {
        panic!(
            "no service 10s after crash recovery: {e}\n{}",
            pg.log_tail()
        );
    }
    // A client told 08006 keeps its session and may retry on it.
    if !busy.is_closed() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match busy.simple_query("SELECT 1").await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("session not usable again: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Reads a backend reply to the end and returns the SQLSTATE of its leading ErrorResponse.
async fn error_code_from_reply(stream: &mut TcpStream) -> Result<String, String> {
    let mut raw = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await {
        Err(_) => return Err(format!("connection not closed within 5s (read {raw:?})")),
        Ok(Err(e)) => return Err(format!("read error {e} after {raw:?}")),
        Ok(Ok(_)) => {}
    }
    if raw.first() != Some(&b'E') || raw.len() < 5 {
        return Err(format!("not an ErrorResponse: {raw:?}"));
    }
    let len = i32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
    let end = 1 + usize::try_from(len).map_err(|_| format!("bad length {len}"))?;
    let body = raw
        .get(5..end)
        .ok_or_else(|| format!("truncated: {raw:?}"))?;
    // Fields: a type byte then a NUL-terminated string, until a lone NUL.
    for f in body.split(|b| *b == 0) {
        if f.first() == Some(&b'C') {
            return Ok(String::from_utf8_lossy(&f[1..]).into_owned());
        }
    }
    Err(format!("no SQLSTATE field in {raw:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_is_rejected() {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &[]).await;
    let good = proxy.client().await;

    let mut garbage = Vec::new();
    garbage.extend_from_slice(&16i32.to_be_bytes());
    garbage.extend_from_slice(&196_608i32.to_be_bytes());
    garbage.extend_from_slice(b"\xff\xfe\x01users"); // parameters without terminators
    assert_eq!(garbage.len(), 16);
    let mut version_9_9 = Vec::new();
    version_9_9.extend_from_slice(&8i32.to_be_bytes());
    version_9_9.extend_from_slice(&((9i32 << 16) | 9).to_be_bytes());
    // Each case sends exactly the bytes the proxy must read before it can decide, so the
    // reply is not lost to a reset caused by unread input.
    let cases: [(&str, Vec<u8>); 5] = [
        ("length -1", (-1i32).to_be_bytes().to_vec()),
        ("length 2^31-1", i32::MAX.to_be_bytes().to_vec()),
        ("version 9.9", version_9_9),
        ("unterminated parameters", garbage),
        ("http request", b"GET ".to_vec()),
    ];
    for (name, bytes) in cases {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        match error_code_from_reply(&mut s).await {
            Ok(code) => assert_eq!(code, "08P01", "{name}"),
            Err(e) => panic!("{name}: {e}"),
        }
        let v: i32 = good.query_one("SELECT 3", &[]).await.unwrap().get(0);
        assert_eq!(v, 3, "other clients keep working after {name}");
    }
}

fn run_pgbench(proxy: &TestProxy, args: &[&str]) -> Option<std::process::Output> {
    let port = proxy.port().to_string();
    let mut cmd = std::process::Command::new(client_program("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(args)
        .arg("postgres");
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) => {
            eprintln!("skipping: pgbench not runnable ({e})");
            None
        }
    }
}

async fn pgbench_select_only(protocol: &str) {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &[]).await;
    let Some(init) = tokio::task::block_in_place(|| run_pgbench(&proxy, &["-i", "-s", "1", "-q"]))
    else {
        return;
    };
    assert!(init.status.success(), "pgbench -i: {init:?}");
    let out = tokio::task::block_in_place(|| {
        run_pgbench(
            &proxy,
            &["-S", "-T", "5", "-c", "8", "-j", "2", "-M", protocol],
        )
    })
    .expect("pgbench ran for init");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "pgbench -M {protocol}: {out:?}");
    let processed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no transaction count in:\n{text}"));
    assert!(processed > 0, "{text}");
    match text
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
    {
        Some(failed) => assert!(failed.starts_with("0 "), "failures reported:\n{text}"),
        // Older pgbench has no such line; then the exit status above is the check.
        None => assert!(!text.contains("failed"), "{text}"),
    }
    eprintln!("pgbench -M {protocol}: {processed} transactions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_protocol() {
    pgbench_select_only("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol() {
    pgbench_select_only("extended").await;
}
