//! The proxy relays the PostgreSQL protocol faithfully: simple and extended queries,
//! transactions, errors, COPY in both directions, very large rows and notices.

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use common::proxy::TestProxy;
use common::TempPostgres;

async fn setup(flags: &[&str]) -> (TempPostgres, TestProxy) {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .expect("start postgres");
    let proxy = TestProxy::start(&pg, flags).await;
    (pg, proxy)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_command_and_script() {
    let (_pg, proxy) = setup(&[]).await;

    let out = proxy.psql(&["-tA", "-c", "SELECT 40 + 2"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "42");

    let mut script = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        script,
        "CREATE TABLE fruit (id int PRIMARY KEY, name text);\n\
         INSERT INTO fruit VALUES (1, 'apple'), (2, 'pear'), (3, 'plum');\n\
         BEGIN;\n\
         UPDATE fruit SET name = upper(name) WHERE id = 2;\n\
         COMMIT;\n\
         SELECT string_agg(name, ',' ORDER BY id) FROM fruit;"
    )
    .unwrap();
    let path = script.path().to_str().unwrap().to_string();
    let out = proxy.psql(&["-tA", "-q", "-f", &path]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "apple,PEAR,plum");

    // A failing statement makes psql exit non-zero with the server's message.
    let out = proxy.psql(&["-c", "SELECT * FROM no_such_table"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_table"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.client().await;

    let msgs = c
        .simple_query("SELECT 1 AS a; SELECT 'two' AS b")
        .await
        .unwrap();
    let values: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    let row = c
        .query_one(
            "SELECT $1::int + $2::int, $3::text || '!'",
            &[&20i32, &22i32, &"hi"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");

    // A named prepared statement is reused across executions.
    let stmt = c.prepare("SELECT $1::bigint * 2").await.unwrap();
    for i in 0..50i64 {
        let v: i64 = c.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(v, i * 2);
    }

    // Multi-row results and NULLs.
    let rows = c
        .query(
            "SELECT g, CASE WHEN g % 2 = 0 THEN NULL ELSE g::text END \
             FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows[999].get::<_, i32>(0), 1000);
    assert_eq!(rows[1].get::<_, Option<String>>(1), None);
    assert_eq!(rows[2].get::<_, Option<String>>(1).as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_discards_rows() {
    let (pg, proxy) = setup(&[]).await;
    let mut c = proxy.client().await;
    c.batch_execute("CREATE TABLE t (x int)").await.unwrap();

    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let inside: i64 = tx
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 1, "the transaction sees its own row");
    tx.rollback().await.unwrap();

    let after: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 0);
    let direct = pg.client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_transaction_then_rollback() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let err = c.simple_query("SELECT 1 / 0").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    c.batch_execute("ROLLBACK").await.unwrap();
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);

    // An error outside a transaction leaves the connection usable too.
    let err = c
        .query_one("SELECT 1 / $1::int", &[&0i32])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let err = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR));
    let v: i32 = c.query_one("SELECT 6", &[]).await.unwrap().get(0);
    assert_eq!(v, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_100k_rows() {
    const ROWS: i64 = 100_000;
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.client().await;
    c.batch_execute("CREATE TABLE items (id bigint, label text)")
        .await
        .unwrap();

    let mut sent = Vec::with_capacity(3_000_000);
    for i in 0..ROWS {
        writeln!(sent, "{i}\titem-{:x}", i.wrapping_mul(2_654_435_761)).unwrap();
    }
    let sink = c
        .copy_in::<_, Bytes>("COPY items FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    for chunk in sent.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, ROWS as u64);

    let row = c
        .query_one(
            "SELECT count(*), sum(id)::bigint, md5(string_agg(label, ',' ORDER BY id)) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), ROWS);
    assert_eq!(row.get::<_, i64>(1), ROWS * (ROWS - 1) / 2);

    let stream = c
        .copy_out("COPY (SELECT id, label FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let received: Vec<u8> = chunks.concat();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "COPY OUT bytes differ from COPY IN bytes");

    // The connection is in a clean state afterwards.
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
}

/// An extended-protocol COPY FROM STDIN (tokio-postgres; libpq with parameters) sends a
/// Sync right after the Execute, which the server ignores in copy-in mode: the session must
/// still hand back its server connection and its slot when the COPY ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_releases_server_and_slot() {
    for mode in ["transaction", "session"] {
        let flags = ["--pool-mode", mode, "--pool-size", "2", "--max-active", "1"];
        let (_pg, proxy) = setup(&flags).await;
        let c = proxy.client().await;
        c.batch_execute("CREATE TABLE t (id int)").await.unwrap();
        let sink = c.copy_in::<_, Bytes>("COPY t FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        sink.send(Bytes::from_static(b"1\n2\n")).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 2);
        let other = proxy.client().await;
        let count = other.query_one("SELECT count(*) FROM t", &[]);
        let n: i64 = tokio::time::timeout(Duration::from_secs(10), count)
            .await
            .unwrap_or_else(|_| panic!("{mode}: no answer after the COPY"))
            .unwrap_or_else(|e| panic!("{mode}: {e}"))
            .get(0);
        assert_eq!(n, 2, "{mode}");
        let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 1, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_row() {
    const LEN: usize = 100 * 1024 * 1024;
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.client().await;
    let row = c
        .query_one("SELECT repeat('x', $1::int)", &[&(LEN as i32)])
        .await
        .unwrap();
    let s: &str = row.get(0);
    assert_eq!(s.len(), LEN);
    assert!(s.bytes().all(|b| b == b'x'));
    drop(row);

    // And in the other direction: a 100 MB parameter.
    let big = "y".repeat(LEN);
    let n: i32 = c
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client() {
    let (_pg, proxy) = setup(&[]).await;
    let (client, mut conn) = tokio_postgres::connect(&proxy.url(), NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notice(n) = msg {
                let _ = tx.send(n.message().to_string());
            }
        }
    });

    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'first %', 1; RAISE NOTICE 'second %', 2; END $$")
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            other => panic!("notice missing: {other:?}, got so far {got:?}"),
        }
    }
    assert_eq!(got, ["first 1", "second 2"]);
}

/// Clients sharing a small transaction-mode pool each prepare statements under the same
/// driver-chosen names (tokio-postgres numbers them per connection) and execute them later,
/// possibly on another server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_across_shared_server_connections() {
    let (_pg, proxy) = setup(&["--pool-mode", "transaction", "--pool-size", "2"]).await;
    const CLIENTS: usize = 8;
    // One server connection sleeps while the clients prepare, so every Parse lands on the
    // other one; executions afterwards spread over both.
    let sleeper = proxy.client().await;
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(1)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for client_no in 0..CLIENTS as i64 {
        let (url, barrier, start) = (proxy.url(), barrier.clone(), start.clone());
        tasks.spawn(async move {
            let c = common::connect(&url).await;
            let prepared = async {
                let double = c.prepare("SELECT $1::bigint * 2").await?;
                let label = c.prepare("SELECT $1::text || '-' || $2::bigint").await?;
                Ok::<_, tokio_postgres::Error>((double, label))
            }
            .await;
            // Every client prepares before any executes, and each round of executions waits
            // for all clients, so preparing and executing interleave across the pool.
            start.wait().await;
            let mut first_err = prepared.as_ref().err().map(|e| format!("prepare: {e:?}"));
            for i in 0..25i64 {
                if let (None, Ok((double, label))) = (&first_err, &prepared) {
                    let x = client_no * 100 + i;
                    let round = async {
                        let v: i64 = c.query_one(double, &[&x]).await?.get(0);
                        let s: String = c.query_one(label, &[&"c", &i]).await?.get(0);
                        Ok::<_, tokio_postgres::Error>((v, s))
                    };
                    match round.await {
                        Ok((v, s)) if v == x * 2 && s == format!("c-{i}") => {}
                        Ok(other) => first_err = Some(format!("round {i}: wrong {other:?}")),
                        Err(e) => first_err = Some(format!("round {i}: {e:?}")),
                    }
                }
                barrier.wait().await;
            }
            first_err.map_or(Ok(()), Err)
        });
    }
    sleeping.await.unwrap().expect("sleeper query");
    start.wait().await;
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res.expect("client task panicked") {
            panic!("prepared statement use failed: {e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.client().await;
    c.simple_query("SELECT 1").await.unwrap();

    let (status, _) = proxy.http_get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("pgsluice_client_connections"), "{body}");
    let (status, _) = proxy.http_get("/no-such-page").await;
    assert_eq!(status, 404);
}
