//! Guard v2 against a real PostgreSQL: `--max-active auto` and the client's own
//! `statement_timeout` as a bound on its wait in the queue.

// Each test binary uses a subset of the shared helpers.
mod common;
#[path = "guard_integration/load.rs"]
mod load;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, connect, TestProxy};
use load::{join_all, spawn_loopers, Tally};
use tokio_postgres::error::SqlState;

/// Running statements matching `pattern`, other than the asking session.
async fn running(direct: &tokio_postgres::Client, pattern: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND query LIKE $1 AND pid <> pg_backend_pid()",
            &[&pattern],
        )
        .await
        .expect("query pg_stat_activity")
        .get(0)
}

/// Holds the only slot with `SELECT pg_sleep(secs)` until the returned task ends; returns
/// once the sleep is running upstream.
async fn hold_slot(
    proxy: &TestProxy,
    direct: &tokio_postgres::Client,
    secs: f64,
) -> tokio::task::JoinHandle<()> {
    let c = proxy.client().await;
    let sql = format!("SELECT pg_sleep({secs})");
    let task = tokio::spawn(async move {
        c.simple_query(&sql).await.expect("the holder's sleep");
    });
    for _ in 0..200 {
        if running(direct, "SELECT pg_sleep(%").await > 0 {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the holder's sleep never started");
}

fn is_statement_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
        && e.as_db_error()
            .is_some_and(|d| d.message().contains("statement timeout"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_past_the_clients_statement_timeout_is_refused_with_57014() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "1",
            "--pool-size",
            "4",
            "--queue-timeout",
            "10s",
        ],
    )
    .await;
    let direct = pg.client().await;
    direct
        .batch_execute("CREATE TABLE st_probe (n int)")
        .await
        .unwrap();

    // Declared at startup (options=-c statement_timeout=300ms).
    let url = format!("{}&options=-c%20statement_timeout%3D300ms", proxy.url());
    let bounded = connect(&url).await;
    let holder = hold_slot(&proxy, &direct, 2.0).await;
    let t = Instant::now();
    let err = bounded
        .simple_query("INSERT INTO st_probe VALUES (1)")
        .await
        .expect_err("queued past its statement_timeout");
    assert!(is_statement_timeout(&err), "{err:?}");
    assert!(
        !holder.is_finished(),
        "refused only after the slot came free ({:?})",
        t.elapsed()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "refused before its bound"
    );
    holder.await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM st_probe", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the refused INSERT ran anyway");
    // The connection is still usable, and its timeout still applies to what runs.
    bounded.simple_query("SELECT 1").await.unwrap();

    // Set with SET, learnt after the statement.
    let c = proxy.client().await;
    c.simple_query("SET statement_timeout = '200ms'")
        .await
        .unwrap();
    let holder = hold_slot(&proxy, &direct, 1.5).await;
    let err = c
        .simple_query("SELECT 1")
        .await
        .expect_err("queued past 200ms");
    assert!(is_statement_timeout(&err), "{err:?}");
    assert!(!holder.is_finished());
    holder.await.unwrap();
    // Turned off again: the client waits as long as the queue allows.
    c.simple_query("SET statement_timeout = 0").await.unwrap();
    let holder = hold_slot(&proxy, &direct, 0.6).await;
    c.simple_query("SELECT 1")
        .await
        .expect("no statement_timeout: waits for the slot");
    holder.await.unwrap();

    // Without a timeout of its own, a client waits its queue timeout as before.
    let plain = proxy.client().await;
    let holder = hold_slot(&proxy, &direct, 0.6).await;
    plain.simple_query("SELECT 1").await.expect("waits");
    holder.await.unwrap();
}

/// `--max-active auto` on a closed loop of more clients than connections: never more
/// queries running than the pool has connections, no refusals, and the limit is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_limit_stays_within_the_pool_without_refusals() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "auto",
            "--pool-size",
            "4",
            "--max-queue",
            "1000",
            "--queue-timeout",
            "10s",
        ],
    )
    .await;
    let direct = pg.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let tasks = spawn_loopers(&proxy, "auto", 20, "SELECT pg_sleep(0.05)", &stop, &tally).await;
    let t0 = Instant::now();
    let mut max_seen = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        let n = running(&direct, "SELECT pg_sleep(%").await;
        max_seen = max_seen.max(n);
        assert!(n <= 4, "{n} queries running over a pool of 4");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = proxy.http_get("/pools").await;
    stop.store(true, Ordering::Relaxed);
    join_all(tasks).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let g = &v["guard"];
    assert_eq!(g["adaptive"], true, "{g}");
    let (limit, base) = (
        g["limit"].as_u64().unwrap(),
        g["base_limit"].as_u64().unwrap(),
    );
    assert!((1..=4).contains(&limit) && (2..=4).contains(&base), "{g}");
    let (ok, shed, unavailable, other) = tally.get();
    assert_eq!(
        (shed, unavailable, other),
        (0, 0, 0),
        "refusals in a stable loop"
    );
    assert!(ok > 0 && max_seen >= 2, "ok={ok} max_seen={max_seen}");
}
