//! Cancellation through the proxy against a real PostgreSQL: departed clients, CancelRequests,
//! query and idle-in-transaction timeouts, and cancels that must not hit anyone else.

// Each test binary uses a subset of the shared helpers.
mod common;
#[path = "cancel_integration/raw.rs"]
mod raw;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, connect, TestProxy};
use raw::{error_code, RawClient};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Backends currently running a statement whose text contains `marker`, other than the
/// asking session.
async fn running_with(direct: &tokio_postgres::Client, marker: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
            &[&marker],
        )
        .await
        .expect("query pg_stat_activity")
        .get(0)
}

/// Polls until a statement containing `marker` is running; panics after `limit`.
async fn wait_running(direct: &tokio_postgres::Client, marker: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while running_with(direct, marker).await == 0 {
        assert!(
            Instant::now() < deadline,
            "statement {marker:?} never started running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls every ~5 ms until no statement containing `marker` runs; returns how long it took.
async fn wait_not_running(
    direct: &tokio_postgres::Client,
    marker: &str,
    limit: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if running_with(direct, marker).await == 0 {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Server connections the proxy keeps: every client backend but this one and health
/// checks (a pooled connection carries its last client's application_name).
async fn proxy_backends(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() AND application_name <> 'pgsluice-health'",
            &[],
        )
        .await
        .expect("count proxy backends")
        .get(0)
}

/// First column of the first row, over the simple protocol: tokio-postgres names its
/// prepared statements, and those do not follow a client across pooled server connections.
async fn scalar(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Polls `/pools` until the guard reports at least `n` queued queries.
async fn wait_queued(proxy: &TestProxy, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = proxy.http_get("/pools").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("pools JSON");
        if v["guard"]["queued"].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {n} queued: {body}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_cancels_backend_quickly() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4"]).await;
    let direct = pg.client().await;
    let mut latencies = Vec::new();
    let mut max_backends = 0;
    for i in 0..20 {
        let marker = format!("cancel-try-{i}");
        let mut raw = RawClient::connect(proxy.addr(), "victim").await;
        let sent = Instant::now();
        raw.send_query(&format!("SELECT pg_sleep(30) /* {marker} */"))
            .await;
        wait_running(&direct, &marker, Duration::from_secs(5)).await;
        // Let the statement run a while so the cancel hits real work, not startup.
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(sent.elapsed())).await;
        let closed = Instant::now();
        drop(raw);
        wait_not_running(&direct, &marker, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{marker}: backend still running 10 s after close"));
        latencies.push(closed.elapsed());
        max_backends = max_backends.max(proxy_backends(&direct).await);
    }
    // The server connections were reused: the pool never grew past its size.
    assert!(
        max_backends <= 4,
        "proxy held {max_backends} server connections (pool size 4)"
    );
    // And the proxy still serves.
    let c = proxy.client().await;
    assert_eq!(scalar(&c, "SELECT 5").await, "5");

    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    println!(
        "CANCEL_LATENCY_MS n={} p50={:.1} p99={:.1} max={:.1} (socket close -> backend no longer active, 5 ms polling)",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    // On a loaded 2-core machine a single try can stall (seen once: 4.3 s while 19 of 20 took
    // under 15 ms), so the bound tolerates one outlier per 20 but no systemic slowness, and
    // every try must end within the cancel grace.
    let p95 = percentile(&latencies, 0.95);
    assert!(
        p95 < Duration::from_secs(1),
        "p95 {p95:?} (p99 {p99:?}): {latencies:?}"
    );
    assert!(max < Duration::from_secs(6), "max {max:?}: {latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_running_query() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4"]).await;
    let direct = pg.client().await;
    let c = Arc::new(proxy.client().await);
    let token = c.cancel_token();
    let runner = {
        let c = c.clone();
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30) /* cancel-me */").await })
    };
    wait_running(&direct, "cancel-me", Duration::from_secs(5)).await;
    let t0 = Instant::now();
    token.cancel_query(NoTls).await.expect("send cancel");
    let res = tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("query still running 5 s after cancel")
        .unwrap();
    let took = t0.elapsed();
    let err = res.expect_err("query should be cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    println!("cancel request -> 57014 in {took:?}");
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert_eq!(running_with(&direct, "cancel-me").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cancels_never_hit_other_clients() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--queue-timeout", "30s"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let b_ok = Arc::new(AtomicU64::new(0));
    let b_cancelled = Arc::new(AtomicU64::new(0));
    let b_other = Arc::new(AtomicU64::new(0));
    let b_shed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..20 {
        let c = connect(&proxy.url_with_app("workers")).await;
        let (stop, ok, cancelled, other, shed) = (
            stop.clone(),
            b_ok.clone(),
            b_cancelled.clone(),
            b_other.clone(),
            b_shed.clone(),
        );
        workers.push(tokio::spawn(async move {
            for i in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let sql = if (i + w) % 2 == 0 {
                    "SELECT 1"
                } else {
                    "SELECT pg_sleep(0.001)"
                };
                match c.simple_query(sql).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                        cancelled.fetch_add(1, Ordering::Relaxed)
                    }
                    // Shedding under the 20-on-4 load is the guard doing its job.
                    Err(e) if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        shed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("worker error: {:?}", e.as_db_error());
                        other.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Targets run a quick query, then get cancelled while idle: their backend has already
    // gone back to the pool and may be serving a worker.
    let cancels_sent = Arc::new(AtomicU64::new(0));
    let target_cancelled = Arc::new(AtomicU64::new(0));
    let mut targets = Vec::new();
    for _ in 0..4 {
        let c = connect(&proxy.url_with_app("targets")).await;
        let token = c.cancel_token();
        let (stop, sent, hit) = (stop.clone(), cancels_sent.clone(), target_cancelled.clone());
        targets.push(tokio::spawn(async move {
            for _ in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.simple_query("SELECT 1").await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                        hit.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {}
                    Err(e) => panic!("target error: {e:?}"),
                }
                token.cancel_query(NoTls).await.expect("send cancel");
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for t in workers.into_iter().chain(targets) {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("client loop hung")
            .unwrap();
    }
    let (ok, cancelled, other) = (
        b_ok.load(Ordering::Relaxed),
        b_cancelled.load(Ordering::Relaxed),
        b_other.load(Ordering::Relaxed),
    );
    let sent = cancels_sent.load(Ordering::Relaxed);
    println!(
        "isolation: worker queries ok={ok} shed={} cancelled={cancelled} other_errors={other}; \
         stale cancels sent={sent}; targets cancelled={}",
        b_shed.load(Ordering::Relaxed),
        target_cancelled.load(Ordering::Relaxed)
    );
    assert!(sent >= 50, "too few cancels sent ({sent}) to mean anything");
    assert!(ok >= 200, "too few worker queries ({ok})");
    assert_eq!(
        cancelled, 0,
        "a worker's query was cancelled by someone else's token"
    );
    assert_eq!(other, 0, "workers saw other errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_and_session_continues() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "2", "--query-timeout", "200ms"]).await;
    let direct = pg.client().await;
    let c = proxy.client().await;
    let t0 = Instant::now();
    let err = c
        .simple_query("SELECT pg_sleep(5) /* too-slow */")
        .await
        .expect_err("query must time out");
    let took = t0.elapsed();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let msg = err.as_db_error().map(|d| d.message().to_string());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.starts_with("pgsluice: query timeout")),
        "message: {msg:?}"
    );
    assert!(
        took >= Duration::from_millis(180),
        "timed out early: {took:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let idle = wait_not_running(&direct, "too-slow", Duration::from_millis(500)).await;
    assert!(
        idle.is_some(),
        "pg_sleep(5) still running 500 ms after the error"
    );
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    println!("query timeout error after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_queued_query_answers_at_once() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--pool-size",
            "4",
            "--max-active",
            "1",
            "--queue-timeout",
            "10s",
        ],
    )
    .await;
    let direct = pg.client().await;
    let x = Arc::new(proxy.client().await);
    let y = Arc::new(connect(&proxy.url_with_app("y")).await);
    let x_run = {
        let x = x.clone();
        tokio::spawn(async move { x.simple_query("SELECT pg_sleep(2) /* x-holds */").await })
    };
    wait_running(&direct, "x-holds", Duration::from_secs(5)).await;
    let y_run = {
        let y = y.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (y.simple_query("SELECT 1").await, t)
        })
    };
    // The guard sheds a waiter of a standing queue after ~100 ms, so cancel as soon as
    // the admin view shows Y waiting.
    wait_queued(&proxy, 1, Duration::from_secs(2)).await;
    assert!(!y_run.is_finished(), "Y should be queued behind X");
    let t0 = Instant::now();
    y.cancel_token().cancel_query(NoTls).await.unwrap();
    let (res, _) = tokio::time::timeout(Duration::from_secs(5), y_run)
        .await
        .expect("queued query not answered")
        .unwrap();
    let took = t0.elapsed();
    let err = res.expect_err("queued query should be cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(
        took < Duration::from_millis(700),
        "cancel answered after {took:?}"
    );
    assert!(
        !x_run.is_finished(),
        "X finished first: the cancel was not answered at once"
    );
    x_run.await.unwrap().expect("X's query");
    assert_eq!(scalar(&y, "SELECT 7").await, "7");
    println!("queued cancel answered in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_queue_starts_no_work() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--pool-size",
            "4",
            "--max-active",
            "1",
            "--queue-timeout",
            "10s",
        ],
    )
    .await;
    let direct = pg.client().await;
    let x = Arc::new(proxy.client().await);
    let x_run = {
        let x = x.clone();
        tokio::spawn(async move { x.simple_query("SELECT pg_sleep(1.5) /* x-first */").await })
    };
    wait_running(&direct, "x-first", Duration::from_secs(5)).await;
    let mut y = RawClient::connect(proxy.addr(), "y").await;
    y.send_query("SELECT pg_sleep(5) /* y-queued */").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(y);
    tokio::time::timeout(Duration::from_secs(5), x_run)
        .await
        .expect("X hung")
        .unwrap()
        .expect("X's query");
    // For a while after X's slot frees, Y's statement must never appear upstream.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let seen: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND strpos(query, 'y-queued') > 0",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, 0, "the departed client's query reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scalar(&x, "SELECT 3").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_releases_its_locks() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--cancel-grace", "2s"]).await;
    let direct = pg.client().await;
    direct
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // Killed while idle inside the transaction, and killed while a statement runs in it.
    for (case, busy) in [("idle", false), ("busy", true)] {
        let mut raw = RawClient::connect(proxy.addr(), "locker").await;
        raw.send_query("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            .await;
        let msgs = raw.read_until_ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!(msgs.last().unwrap().1, b"T", "{case}: not in a transaction");
        if busy {
            raw.send_query("SELECT pg_sleep(30) /* lock-holder */")
                .await;
            wait_running(&direct, "lock-holder", Duration::from_secs(5)).await;
        }
        let killed = Instant::now();
        drop(raw);
        let read = async {
            direct
                .batch_execute("SET lock_timeout = '10s'")
                .await
                .unwrap();
            direct.query("SELECT * FROM t", &[]).await
        };
        let rows = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("{case}: lock still held 10 s after the kill"))
            .unwrap();
        let took = killed.elapsed();
        assert_eq!(rows.len(), 1);
        assert!(
            took < Duration::from_secs(3),
            "{case}: lock released after {took:?}"
        );
        println!("{case}: lock released {took:?} after the client was killed");
    }
    // The connection went back to the pool clean: no transaction is left open.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let open: Vec<String> = direct
            .query(
                "SELECT format('%s %s %s', pid, state, query) FROM pg_stat_activity \
                 WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "transactions left open: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_closes_and_rolls_back() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &["--pool-size", "4", "--idle-in-transaction-timeout", "300ms"],
    )
    .await;
    let direct = pg.client().await;
    let mut raw = RawClient::connect(proxy.addr(), "sleepy").await;
    raw.send_query("BEGIN; SELECT 1").await;
    let msgs = raw.read_until_ready(Duration::from_secs(5)).await.unwrap();
    assert_eq!(msgs.last().unwrap().1, b"T");
    let t0 = Instant::now();
    let (tag, body) = tokio::time::timeout(Duration::from_secs(3), raw.read_msg())
        .await
        .expect("no error within 3 s")
        .expect("connection closed without an error");
    let took = t0.elapsed();
    assert_eq!(tag, b'E');
    assert_eq!(error_code(&body).as_deref(), Some("25P03"));
    assert!(took >= Duration::from_millis(250), "closed early: {took:?}");
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
    // Then the proxy closes the connection.
    let eof = tokio::time::timeout(Duration::from_secs(3), raw.read_msg()).await;
    assert!(matches!(eof, Ok(Err(_))), "connection not closed: {eof:?}");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let open: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server-side transaction still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("idle-in-transaction close after {took:?}");
}

/// A backend that cannot answer the cancel (frozen) must not keep its pooled connection:
/// after --cancel-grace the proxy closes it and serves others on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_backend_is_dropped_after_grace() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--cancel-grace", "500ms"]).await;
    let direct = pg.client().await;
    let mut raw = RawClient::connect(proxy.addr(), "frozen").await;
    raw.send_query("SELECT pg_sleep(30) /* frozen-backend */")
        .await;
    wait_running(&direct, "frozen-backend", Duration::from_secs(5)).await;
    let pid: i32 = direct
        .query_one(
            "SELECT pid FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND strpos(query, 'frozen-backend') > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // SAFETY: kill(2) on a backend of the cluster this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let killed = Instant::now();
    drop(raw);
    // The only pooled connection is stuck; a new client is served once the grace expires.
    let c = proxy.client().await;
    let res = tokio::time::timeout(Duration::from_secs(5), scalar(&c, "SELECT 11")).await;
    let took = killed.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(
        res.expect("no query served while a frozen backend held the pool"),
        "11"
    );
    assert!(
        took >= Duration::from_millis(400),
        "served before the grace: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "served after {took:?}");
    println!("frozen backend replaced {took:?} after the client left");
    // Resumed, the frozen backend finds its connection closed and exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if alive == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "frozen backend {pid} lingers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
