//! RESET, RESET ALL, DISCARD ALL and SET ... TO DEFAULT through the proxy give what they give
//! on a direct connection: the client's startup values (PostgreSQL takes startup parameters
//! as the session's reset values). Also what a client that sends no application_name sees,
//! and a Terminate sent before the startup packet. Pool size 1 makes clients share one
//! server connection.

mod common;

use std::time::Duration;

use common::{cluster, Raw, TempPostgres, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// What pg_regress sends: PGDATESTYLE, PGTZ, PGOPTIONS=-c intervalstyle=..., PGAPPNAME.
const REGRESS: [(&str, &str); 4] = [
    ("DateStyle", "Postgres, MDY"),
    ("TimeZone", "PST8PDT"),
    ("options", "-c intervalstyle=postgres_verbose"),
    ("application_name", "pg_regress/t"),
];

async fn one(c: &mut Raw, sql: &str) -> String {
    c.query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

async fn all(c: &mut Raw, sql: &str) -> Vec<String> {
    c.batch(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// The same statements, run on `c`, answer as on a direct connection with the same startup
/// parameters, batch by batch.
async fn same_as_direct(pg: &TempPostgres, c: &mut Raw, batches: &[&str]) {
    let mut d = Raw::connect(pg.addr(), &REGRESS).await.expect("direct");
    for b in batches {
        let want = all(&mut d, b).await;
        let got = all(c, b).await;
        assert_eq!(got, want, "{b}");
    }
}

/// The checks a RESET must pass, each batch answered as directly.
const RESET_BATCHES: [&str; 11] = [
    "SHOW DateStyle",
    "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET IntervalStyle = iso_8601; \
     SELECT now()::date::text = current_date::text",
    "RESET DateStyle; SHOW DateStyle",
    "SHOW DateStyle",
    "SET TimeZone TO DEFAULT; SHOW TimeZone",
    "SHOW TimeZone",
    "RESET ALL; SHOW IntervalStyle",
    "SELECT setting || '/' || reset_val FROM pg_settings WHERE name IN \
     ('DateStyle', 'TimeZone', 'IntervalStyle', 'application_name') ORDER BY name",
    "SET TimeZone = 'UTC'",
    "DISCARD ALL",
    "SHOW TimeZone",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reset_returns_to_startup_values() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "session"]).await;
    let mut a = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    assert_eq!(a.status["DateStyle"], "Postgres, MDY");
    assert_eq!(a.status["application_name"], "pg_regress/t");
    let a_pid = one(&mut a, "SELECT pg_backend_pid()").await;
    // Within the batch that runs the RESET too, and in what the server reports.
    a.batch("SET DateStyle = ISO").await.unwrap();
    assert_eq!(a.status["DateStyle"], "ISO, MDY");
    let got = all(&mut a, "RESET DateStyle; SELECT DATE '2024-03-05'::text").await;
    assert_eq!(got, ["03-05-2024"]);
    assert_eq!(a.status["DateStyle"], "Postgres, MDY");
    same_as_direct(&pg, &mut a, &RESET_BATCHES).await;
    drop(a);

    // A client with other startup parameters does not get A's as its reset values.
    let mut b = Raw::connect(proxy.addr(), &[]).await.expect("startup");
    let mut d = Raw::connect(pg.addr(), &[]).await.expect("direct");
    for sql in [
        "SHOW DateStyle",
        "RESET ALL; SHOW TimeZone",
        "SHOW IntervalStyle",
    ] {
        assert_eq!(all(&mut b, sql).await, all(&mut d, sql).await, "{sql}");
    }
    drop(b);
    // A client with A's startup parameters again: still right (whichever backend it got).
    let mut c = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    same_as_direct(&pg, &mut c, &RESET_BATCHES).await;
    let _ = a_pid;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reuses_backends_of_equal_startup_parameters() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "session"]).await;
    let mut a = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    let a_pid = one(&mut a, "SELECT pg_backend_pid()").await;
    drop(a);
    let mut b = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    assert_eq!(one(&mut b, "SELECT pg_backend_pid()").await, a_pid);
    assert_eq!(
        one(&mut b, "RESET ALL; SHOW DateStyle").await,
        "Postgres, MDY"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_set_to_default_value_survives_other_resets() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "transaction"]).await;
    let mut a = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    let mut other = Raw::connect(proxy.addr(), &[]).await.expect("startup");
    // The server's defaults, set explicitly.
    a.batch("SET IntervalStyle = postgres").await.unwrap();
    a.batch("SET DateStyle = 'ISO, MDY'").await.unwrap();
    assert_eq!(one(&mut other, "SHOW IntervalStyle").await, "postgres");
    a.batch("RESET enable_seqscan").await.unwrap();
    assert_eq!(one(&mut other, "SHOW DateStyle").await, "ISO, MDY");
    assert_eq!(one(&mut a, "SHOW IntervalStyle").await, "postgres");
    assert_eq!(one(&mut a, "SHOW DateStyle").await, "ISO, MDY");
    a.batch("BEGIN; RESET enable_seqscan; COMMIT")
        .await
        .unwrap();
    assert_eq!(one(&mut a, "SHOW IntervalStyle").await, "postgres");

    // RESET of a startup parameter returns to the client's startup value (from the next
    // batch on in transaction mode), SET ... TO DEFAULT too.
    a.batch("RESET DateStyle").await.unwrap();
    assert_eq!(
        a.status["DateStyle"], "Postgres, MDY",
        "told the startup value, not the server's default"
    );
    assert_eq!(one(&mut other, "SHOW DateStyle").await, "ISO, MDY");
    assert_eq!(all(&mut a, "SHOW DateStyle").await, ["Postgres, MDY"]);
    assert_eq!(a.status["DateStyle"], "Postgres, MDY");
    a.batch("SET TimeZone = 'UTC'").await.unwrap();
    a.batch("SET TimeZone TO DEFAULT").await.unwrap();
    assert_eq!(one(&mut a, "SHOW TimeZone").await, "PST8PDT");
    a.batch("RESET ALL").await.unwrap();
    assert_eq!(one(&mut other, "SHOW IntervalStyle").await, "postgres");
    assert_eq!(one(&mut a, "SHOW IntervalStyle").await, "postgres_verbose");
    assert_eq!(one(&mut a, "SHOW application_name").await, "pg_regress/t");
    proxy.shutdown().await;
}

/// The reported parameters a client has been told by its ReadyForQuery, compared with a
/// direct connection's after the same batch.
fn reported(c: &Raw) -> Vec<(&'static str, Option<String>)> {
    ["DateStyle", "TimeZone", "IntervalStyle", "application_name"]
        .into_iter()
        .map(|n| (n, c.status.get(n).cloned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_parameter_status_after_reset_is_the_startup_value() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "transaction"]).await;
    let mut a = Raw::connect(proxy.addr(), &REGRESS).await.expect("startup");
    let mut other = Raw::connect(proxy.addr(), &[]).await.expect("startup");
    let mut d = Raw::connect(pg.addr(), &REGRESS).await.expect("direct");
    assert_eq!(reported(&a), reported(&d));
    for b in [
        "SET DateStyle = 'German'; SET TimeZone = 'Asia/Tokyo'",
        "RESET ALL",
        "SET DateStyle = 'SQL'",
        "DISCARD ALL",
        "SET IntervalStyle = iso_8601; SET application_name = 'x'",
        "RESET DateStyle; RESET IntervalStyle",
        "SET TimeZone TO DEFAULT",
        "SET TimeZone = 'UTC'; RESET TimeZone",
        "BEGIN; SET DateStyle = 'German'; COMMIT",
        "BEGIN; RESET ALL; ROLLBACK",
        "RESET ALL; SET DateStyle = 'ISO, MDY'",
        "SHOW DateStyle",
        "RESET ALL",
    ] {
        let want = all(&mut d, b).await;
        let got = all(&mut a, b).await;
        assert_eq!(got, want, "{b}");
        // What the client has been told when its ReadyForQuery arrives.
        assert_eq!(reported(&a), reported(&d), "after {b}");
        // Another client on the same server connection with the server's defaults.
        all(&mut other, "SELECT 1").await;
        let got = all(&mut a, "SHOW DateStyle; SHOW TimeZone").await;
        assert_eq!(
            got,
            all(&mut d, "SHOW DateStyle; SHOW TimeZone").await,
            "{b}"
        );
        assert_eq!(
            reported(&a),
            reported(&d),
            "after {b}, on a switched server"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_application_name_shows_the_servers_default() {
    let pg = cluster().await;
    let mut d = Raw::connect(pg.addr(), &[]).await.expect("direct");
    let want = all(
        &mut d,
        "SHOW application_name; SELECT current_setting('application_name')",
    )
    .await;
    assert_eq!(want, ["", ""]);
    for mode in ["session", "transaction"] {
        let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", mode]).await;
        let mut c = Raw::connect(proxy.addr(), &[]).await.expect("startup");
        assert_eq!(c.status["application_name"], "", "{mode}");
        let got = all(
            &mut c,
            "SHOW application_name; SELECT current_setting('application_name')",
        )
        .await;
        assert_eq!(got, want, "{mode}");
        assert_eq!(one(&mut c, "RESET ALL; SHOW application_name").await, "");
        proxy.shutdown().await;
    }
}

/// What the other end sends, after `bytes` and the end of our side, until it closes.
async fn answer_to(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .ok();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_startup_closes_silently() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &[]).await;
    let terminate = [b'X', 0, 0, 0, 4];
    assert_eq!(answer_to(pg.addr(), &terminate).await, b"", "PostgreSQL");
    assert_eq!(answer_to(proxy.addr(), &terminate).await, b"", "pgsluice");
    // A connection closed before sending anything gets nothing either.
    assert_eq!(answer_to(proxy.addr(), b"").await, b"");
    // The proxy still serves.
    let mut c = Raw::connect(proxy.addr(), &[]).await.expect("startup");
    assert_eq!(one(&mut c, "SELECT 1").await, "1");
    proxy.shutdown().await;
}
