//! A client that holds a server connection can always finish its transaction: more clients
//! than connections running explicit transactions, for pool sizes below, equal to and above
//! `--max-active`, in both pool modes, over several pools of one upstream, and across a
//! pause. Every answer is checked; a statement that takes longer than `STALL` is a stall.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use common::proxy::TestProxy;
use common::{try_connect, TempPostgres};

/// No statement of these tiny transactions may take this long; the queue timeout (5 s by
/// default) is longer, so a deadlock broken only by it counts as a stall.
const STALL: Duration = Duration::from_secs(3);

async fn new_pg() -> TempPostgres {
    common::cluster().await
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {} ({:?})", d.code().code(), d.message(), d.hint()),
        None => e.to_string(),
    }
}

/// The first column of the first row of a simple query.
async fn one(c: &Client, sql: &str) -> Result<String, String> {
    let fut = c.simple_query(sql);
    let msgs = match tokio::time::timeout(STALL, fut).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(format!("{sql}: {}", describe(&e))),
        Err(_) => return Err(format!("{sql}: stalled for {STALL:?}")),
    };
    msgs.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}: no row"))
}

async fn exec(c: &Client, sql: &str) -> Result<(), String> {
    match tokio::time::timeout(STALL, c.batch_execute(sql)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{sql}: {}", describe(&e))),
        Err(_) => Err(format!("{sql}: stalled for {STALL:?}")),
    }
}

/// `BEGIN; SELECT id; SELECT n; COMMIT` `rounds` times, each answer checked.
async fn tx_loop(c: &Client, id: usize, rounds: usize) -> Result<(), String> {
    for n in 0..rounds {
        exec(c, "BEGIN").await?;
        let got = one(c, &format!("SELECT {id}")).await?;
        if got != id.to_string() {
            return Err(format!("client {id}: SELECT {id} answered {got}"));
        }
        let got = one(c, &format!("SELECT {n} + 0")).await?;
        if got != n.to_string() {
            return Err(format!("client {id}: SELECT {n} answered {got}"));
        }
        let xact = one(c, "SELECT txid_current_if_assigned() IS NULL").await?;
        if xact != "t" {
            return Err(format!("client {id}: read-only transaction has an xid"));
        }
        exec(c, "COMMIT").await?;
    }
    Ok(())
}

/// `clients` clients over the proxy started with `flags`, all running transactions at once.
async fn run(pg: &TempPostgres, flags: &[&str], clients: usize, rounds: usize) {
    let proxy = TestProxy::start(pg, flags).await;
    let url = proxy.url();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = try_connect(&url)
                .await
                .map_err(|e| format!("client {id} connect: {e}"))?;
            tx_loop(&c, id, rounds).await
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.expect("client task") {
            errors.push(e);
        }
    }
    assert!(
        errors.is_empty(),
        "{flags:?}, {clients} clients: {} failed in {:?}; first: {}",
        errors.len(),
        t0.elapsed(),
        errors[0]
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_over_four_connections_every_max_active() {
    let pg = new_pg().await;
    for max_active in ["2", "4", "8", "16"] {
        run(
            &pg,
            &[
                "--pool-mode",
                "transaction",
                "--pool-size",
                "4",
                "--max-active",
                max_active,
            ],
            16,
            30,
        )
        .await;
    }
    // The guard's defaults (max-active = pool-size, CoDel on).
    run(&pg, &["--pool-size", "4"], 16, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_pools_with_thirty_two_clients() {
    let pg = new_pg().await;
    for size in ["1", "2"] {
        run(&pg, &["--pool-size", size, "--max-active", "4"], 32, 10).await;
        run(&pg, &["--pool-size", size], 32, 10).await;
    }
}

/// Session mode: sessions hold their connection for life; with max-active below the pool
/// size they compete for slots mid-transaction, and later logins wait for a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_with_fewer_slots_than_connections() {
    let pg = new_pg().await;
    run(
        &pg,
        &[
            "--pool-mode",
            "session",
            "--pool-size",
            "4",
            "--max-active",
            "2",
        ],
        4,
        40,
    )
    .await;
}

/// Logins beyond the pool size wait for a connection and get one as sessions end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_logins_wait_for_a_connection() {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &["--pool-mode", "session", "--pool-size", "2"]).await;
    let url = proxy.url();
    let mut tasks = Vec::new();
    for id in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = try_connect(&url)
                .await
                .map_err(|e| format!("client {id} connect: {e}"))?;
            tx_loop(&c, id, 5).await
            // Dropping the client ends the session and frees its connection.
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("session client");
    }
    proxy.shutdown().await;
}

/// Two pools (two databases) of one upstream share the active-query cap; connections are
/// the scarce resource in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pools_share_one_cap() {
    let pg = new_pg().await;
    pg.psql(&["-c", "CREATE DATABASE second"]);
    let proxy = TestProxy::start(&pg, &["--pool-size", "2", "--max-active", "3"]).await;
    let mut tasks = Vec::new();
    for id in 0..16 {
        let db = if id % 2 == 0 { "postgres" } else { "second" };
        let url = proxy.url_for("postgres", db);
        tasks.push(tokio::spawn(async move {
            let c = try_connect(&url)
                .await
                .map_err(|e| format!("client {id} connect: {e}"))?;
            tx_loop(&c, id, 15).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("client");
    }
    proxy.shutdown().await;
}

/// A pause lets open transactions finish while new work waits for the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transactions_finish_through_a_pause() {
    let pg = new_pg().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "2", "--queue-timeout", "10s"]).await;
    let url = proxy.url();
    let a = try_connect(&url).await.expect("a");
    let b = try_connect(&url).await.expect("b");
    let waiting = try_connect(&url).await.expect("waiting");
    exec(&a, "BEGIN").await.expect("a begin");
    exec(&b, "BEGIN").await.expect("b begin");
    assert_eq!(proxy.http_post("/pause").await.0, 200);
    // A third client's query waits: both connections are taken and the proxy is paused.
    let waiting = Arc::new(waiting);
    let w = waiting.clone();
    let pending = tokio::spawn(async move { one(&w, "SELECT 'after resume'").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "a new query ran during the pause");
    // Both open transactions finish although the proxy is paused and every connection is held.
    assert_eq!(one(&a, "SELECT 1").await.expect("a in tx"), "1");
    exec(&a, "COMMIT").await.expect("a commit");
    assert_eq!(one(&b, "SELECT 2").await.expect("b in tx"), "2");
    exec(&b, "COMMIT").await.expect("b commit");
    assert!(!pending.is_finished(), "a new query ran during the pause");
    assert_eq!(proxy.http_post("/resume").await.0, 200);
    let got = tokio::time::timeout(STALL, pending)
        .await
        .expect("query after resume stalled")
        .expect("task");
    assert_eq!(got.expect("query after resume"), "after resume");
    proxy.shutdown().await;
}
