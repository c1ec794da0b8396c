//! What one client can leave behind on a pooled server connection, and what the next
//! client on that same connection sees. Transaction state and uncommitted data must never
//! leak; in session mode nothing may leak (the proxy runs DISCARD ALL). In transaction mode
//! the tracked session parameters (search_path, TimeZone, statement_timeout, ...) follow
//! their client and must not leak either; other session-level state (untracked settings
//! such as work_mem, PREPARE, LISTEN, temp tables) can reach the next client: that is the
//! documented hazard of transaction pooling, recorded here rather than asserted away.

mod common;

use std::time::Duration;

use common::{cluster, connect, TestProxy};
use futures::SinkExt;
use tokio_postgres::{Client, SimpleQueryMessage};

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// B may be shed (53400, never ran) while A's connection is still being cleaned.
async fn pid_retrying_shed(c: &Client) -> i32 {
    loop {
        match c.query_one("SELECT pg_backend_pid()", &[]).await {
            Ok(row) => return row.get(0),
            Err(e) if e.code().map(|c| c.code()) == Some("53400") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("pg_backend_pid: {e}"),
        }
    }
}

/// First column of the first row of a simple query, as text.
async fn scalar(c: &Client, sql: &str) -> Option<String> {
    let msgs = tokio::time::timeout(Duration::from_secs(10), c.simple_query(sql))
        .await
        .expect("query answered")
        .ok()?;
    msgs.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)).flatten(),
        _ => None,
    })
}

/// Asserts B's session has no open transaction and cannot see uncommitted rows.
async fn assert_clean_tx(b: &Client, what: &str) {
    let err = b
        .simple_query("SAVEPOINT probe")
        .await
        .expect_err("SAVEPOINT outside a transaction must fail");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("25P01"),
        "{what}: B inherited an open transaction ({err})"
    );
    assert_eq!(
        scalar(b, "SELECT count(*) FROM t").await.as_deref(),
        Some("0"),
        "{what}: uncommitted row visible to B"
    );
}

/// Leaves client A in some state, disconnects it, then checks B on the same server.
async fn after_a(proxy: &TestProxy, what: &str, leave: impl AsyncFnOnce(&Client)) -> Client {
    let (a, conn) = tokio_postgres::connect(&proxy.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let a_pid = pid(&a).await;
    leave(&a).await;
    // Abort the connection task too: a COPY in flight would otherwise keep the socket open.
    drop(a);
    conn.abort();
    let b = proxy.client().await;
    let b_pid = tokio::time::timeout(Duration::from_secs(10), pid_retrying_shed(&b))
        .await
        .unwrap_or_else(|_| panic!("{what}: B waited 10s for the only server connection"));
    // A connection the proxy could not clean is closed and replaced, which is also safe.
    eprintln!(
        "{what}: B on {} backend",
        if a_pid == b_pid { "A's" } else { "a fresh" }
    );
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_never_leaks_transaction_state() {
    let pg = cluster().await;
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "transaction"]).await;

    let b = after_a(&proxy, "mid-transaction", async |a| {
        a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
    })
    .await;
    assert_clean_tx(&b, "mid-transaction").await;
    drop(b);

    let b = after_a(&proxy, "failed transaction", async |a| {
        a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        assert!(a.batch_execute("SELECT 1/0").await.is_err());
    })
    .await;
    assert_clean_tx(&b, "failed transaction").await;
    assert_eq!(scalar(&b, "SELECT 5").await.as_deref(), Some("5"));
    drop(b);

    let b = after_a(&proxy, "mid-COPY", async |a| {
        let sink = a.copy_in("COPY t FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        // Dropped without finish(): the client goes away in COPY IN state.
    })
    .await;
    assert_clean_tx(&b, "mid-COPY").await;
    drop(b);

    // Tracked settings stay with their client; untracked ones are recorded, not asserted.
    let default_path = scalar(&proxy.client().await, "SHOW search_path").await;
    let b = after_a(&proxy, "SET", async |a| {
        a.batch_execute(
            "SET search_path = a_only; SET TimeZone = 'Asia/Tokyo'; SET work_mem = '7777kB'",
        )
        .await
        .unwrap();
    })
    .await;
    assert_eq!(
        scalar(&b, "SHOW search_path").await,
        default_path,
        "search_path leaked"
    );
    assert_ne!(
        scalar(&b, "SHOW TimeZone").await.as_deref(),
        Some("Asia/Tokyo"),
        "TimeZone leaked"
    );
    let work_mem = scalar(&b, "SHOW work_mem").await;
    assert_clean_tx(&b, "SET").await;
    drop(b);

    // Session-level state: recorded, not asserted (transaction pooling does not reset it).
    let b = after_a(&proxy, "PREPARE", async |a| {
        a.batch_execute("PREPARE p AS SELECT 1").await.unwrap();
    })
    .await;
    let prepared = scalar(&b, "EXECUTE p").await;
    assert_clean_tx(&b, "PREPARE").await;
    drop(b);

    let b = after_a(&proxy, "LISTEN", async |a| {
        a.batch_execute("LISTEN ch").await.unwrap();
    })
    .await;
    let listening = scalar(&b, "SELECT count(*) FROM pg_listening_channels()").await;
    drop(b);

    let b = after_a(&proxy, "TEMP TABLE", async |a| {
        a.batch_execute("CREATE TEMP TABLE tmp_a (x int)")
            .await
            .unwrap();
    })
    .await;
    let temp = scalar(&b, "SELECT count(*) FROM pg_class WHERE relname = 'tmp_a'").await;
    assert_clean_tx(&b, "TEMP TABLE").await;
    eprintln!(
        "transaction mode, seen by B: work_mem -> {work_mem:?}, EXECUTE p -> {prepared:?}, \
         listening channels -> {listening:?}, A's temp table -> {temp:?}"
    );
    drop(b);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_everything() {
    let pg = cluster().await;
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "session"]).await;

    let b = after_a(&proxy, "session state", async |a| {
        a.batch_execute(
            "SET work_mem = '7777kB'; PREPARE p AS SELECT 1; LISTEN ch; \
             CREATE TEMP TABLE tmp_a (x int)",
        )
        .await
        .unwrap();
    })
    .await;
    assert_ne!(scalar(&b, "SHOW work_mem").await.as_deref(), Some("7777kB"));
    let err = b
        .simple_query("EXECUTE p")
        .await
        .expect_err("prepared leaked");
    assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err}");
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_listening_channels()")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_class WHERE relname = 'tmp_a'")
            .await
            .as_deref(),
        Some("0")
    );
    assert_clean_tx(&b, "session state").await;
    drop(b);

    let b = after_a(&proxy, "session mid-transaction", async |a| {
        a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
    })
    .await;
    assert_clean_tx(&b, "session mid-transaction").await;
    drop(b);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_users_never_share_a_server() {
    let pg = cluster().await;
    let direct = pg.client().await;
    direct.batch_execute("CREATE ROLE u2 LOGIN").await.unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "transaction"]).await;

    let a = proxy.client().await;
    let b = connect(&proxy.url_for("u2", "postgres")).await;
    for round in 0..5 {
        let (pa, pb) = tokio::join!(pid(&a), pid(&b));
        assert_ne!(pa, pb, "round {round}: users share backend {pa}");
        for (p, user) in [(pa, "postgres"), (pb, "u2")] {
            let name: Option<String> = direct
                .query_one(
                    "SELECT usename::text FROM pg_stat_activity WHERE pid = $1",
                    &[&p],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(name.as_deref(), Some(user), "backend {p}");
        }
    }
    drop((a, b));
    proxy.shutdown().await;
}
