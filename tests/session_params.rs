//! Session parameters in transaction mode: startup values and SET/RESET follow each client
//! across pooled server connections and never reach another client. Pool size 1 makes all
//! clients share one server connection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{cluster, connect, try_connect, Raw, TempPostgres, TestProxy};
use tokio_postgres::{Client, SimpleQueryMessage};

const T: Duration = Duration::from_secs(10);

/// First column of the first row of a simple query.
async fn show(c: &Client, sql: &str) -> String {
    let msgs = tokio::time::timeout(T, c.simple_query(sql))
        .await
        .expect("answered")
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn pid(c: &Client) -> String {
    show(c, "SELECT pg_backend_pid()").await
}

/// What a fresh session of the cluster shows, read directly.
async fn defaults(pg: &TempPostgres) -> HashMap<&'static str, String> {
    let d = pg.client().await;
    let mut out = HashMap::new();
    for n in [
        "search_path",
        "TimeZone",
        "statement_timeout",
        "lock_timeout",
        "DateStyle",
    ] {
        out.insert(n, show(&d, &format!("SHOW {n}")).await);
    }
    out
}

fn txn_proxy_flags() -> [&'static str; 4] {
    ["--pool-size", "1", "--pool-mode", "transaction"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_follows_its_client_and_never_leaks() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    pg.client()
        .await
        .batch_execute("CREATE SCHEMA sa")
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("SET search_path = sa, public; SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    // Extended protocol (Parse) as well as simple Query.
    a.execute("SET statement_timeout = '4321ms'", &[])
        .await
        .unwrap();
    assert_eq!(pid(&a).await, pid(&b).await, "one shared server connection");
    for round in 0..3 {
        assert_eq!(
            show(&b, "SHOW search_path").await,
            def["search_path"],
            "round {round}"
        );
        assert_eq!(
            show(&b, "SHOW TimeZone").await,
            def["TimeZone"],
            "round {round}"
        );
        assert_eq!(
            show(&b, "SHOW statement_timeout").await,
            def["statement_timeout"],
            "round {round}"
        );
        assert_eq!(
            show(&a, "SHOW search_path").await,
            "sa, public",
            "round {round}"
        );
        assert_eq!(
            show(&a, "SHOW TimeZone").await,
            "Asia/Tokyo",
            "round {round}"
        );
        assert_eq!(
            show(&a, "SHOW statement_timeout").await,
            "4321ms",
            "round {round}"
        );
    }
    // B's own change does not disturb A either.
    b.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    assert_eq!(show(&a, "SHOW lock_timeout").await, def["lock_timeout"]);
    assert_eq!(show(&b, "SHOW lock_timeout").await, "2s");
    // A client that leaves after SET leaves nothing behind.
    drop(a);
    let c = proxy.client().await;
    assert_eq!(show(&c, "SHOW search_path").await, def["search_path"]);
    assert_eq!(
        show(&c, "SHOW statement_timeout").await,
        def["statement_timeout"]
    );
    // A statement that merely contains SET changes nothing and is not mistaken for one.
    c.batch_execute("CREATE TEMP TABLE t (x int); UPDATE t SET x = 1")
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_and_local_settings_do_not_stick() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute(
        "BEGIN; SET search_path = rolled_back; SET TimeZone = 'Asia/Tokyo'; \
         SET statement_timeout = '9s'; ROLLBACK",
    )
    .await
    .unwrap();
    assert_eq!(show(&b, "SELECT 1").await, "1");
    assert_eq!(show(&a, "SHOW search_path").await, def["search_path"]);
    assert_eq!(show(&a, "SHOW TimeZone").await, def["TimeZone"]);
    assert_eq!(
        show(&a, "SHOW statement_timeout").await,
        def["statement_timeout"]
    );

    // Over several round trips inside the transaction, then rolled back.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    assert_eq!(show(&a, "SHOW lock_timeout").await, "3s");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(show(&b, "SELECT 2").await, "2");
    assert_eq!(show(&a, "SHOW lock_timeout").await, def["lock_timeout"]);

    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET LOCAL statement_timeout = '3s'; SET LOCAL TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(show(&a, "SHOW statement_timeout").await, "3s");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        show(&a, "SHOW statement_timeout").await,
        def["statement_timeout"]
    );
    assert_eq!(show(&a, "SHOW TimeZone").await, def["TimeZone"]);
    assert_eq!(
        show(&b, "SHOW statement_timeout").await,
        def["statement_timeout"]
    );

    // A committed SET inside a transaction does stick, for A only.
    a.batch_execute("BEGIN; SET search_path = kept; COMMIT")
        .await
        .unwrap();
    assert_eq!(show(&b, "SHOW search_path").await, def["search_path"]);
    assert_eq!(show(&a, "SHOW search_path").await, "kept");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_applied_and_reported() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    // What pgjdbc sends.
    let mut j = Raw::connect(
        proxy.addr(),
        &[
            ("client_encoding", "UTF8"),
            ("DateStyle", "SQL, DMY"),
            ("TimeZone", "America/New_York"),
            ("extra_float_digits", "0"),
        ],
    )
    .await
    .expect("startup");
    assert_eq!(j.status["client_encoding"], "UTF8");
    assert_eq!(j.status["DateStyle"], "SQL, DMY");
    assert_eq!(j.status["TimeZone"], "America/New_York");
    let other = proxy.client().await;
    for round in 0..2 {
        assert_eq!(j.query("SHOW TimeZone").await.unwrap(), "America/New_York");
        assert_eq!(
            j.query("SELECT DATE '2024-03-05'::text").await.unwrap(),
            "05/03/2024",
            "round {round}"
        );
        assert_eq!(j.query("SELECT 0.1::float8::text").await.unwrap(), "0.1");
        assert_eq!(show(&other, "SHOW TimeZone").await, def["TimeZone"]);
        assert_eq!(show(&other, "SHOW DateStyle").await, def["DateStyle"]);
        assert_eq!(
            show(&other, "SELECT 0.1::float8::text").await,
            "0.1",
            "extra_float_digits 1 (the default) also prints 0.1"
        );
        assert_eq!(show(&other, "SHOW extra_float_digits").await, "1");
    }
    // The spelling the server uses is reported, not the one the client sent.
    let iso = Raw::connect(proxy.addr(), &[("datestyle", "iso")])
        .await
        .expect("startup");
    assert_eq!(iso.status["DateStyle"], "ISO, MDY");

    // -c settings in `options` are taken like startup parameters.
    let url = format!(
        "{}&options=-c%20search_path%3Dopt_schema%20-c%20statement_timeout%3D7s",
        proxy.url()
    );
    let o = connect(&url).await;
    assert_eq!(show(&o, "SHOW search_path").await, "opt_schema");
    assert_eq!(show(&o, "SHOW statement_timeout").await, "7s");
    assert_eq!(show(&other, "SHOW search_path").await, def["search_path"]);
    assert_eq!(show(&o, "SHOW statement_timeout").await, "7s");

    // RESET returns to the startup value (as in PostgreSQL), RESET ALL to all of them.
    o.batch_execute("SET search_path = changed; SET statement_timeout = '1s'")
        .await
        .unwrap();
    assert_eq!(show(&o, "SHOW search_path").await, "changed");
    o.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(show(&other, "SELECT 3").await, "3");
    assert_eq!(show(&o, "SHOW search_path").await, "opt_schema");
    assert_eq!(show(&o, "SHOW statement_timeout").await, "1s");
    o.batch_execute("SET TimeZone = 'Asia/Tokyo'; RESET ALL")
        .await
        .unwrap();
    assert_eq!(show(&o, "SHOW statement_timeout").await, "7s");
    assert_eq!(show(&o, "SHOW TimeZone").await, def["TimeZone"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_unsupported_startup_values_are_refused() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    let bad = Raw::connect(proxy.addr(), &[("TimeZone", "Bad/Zone")])
        .await
        .err()
        .expect("refused");
    assert_eq!(bad.0, "FATAL");
    assert_eq!(bad.1, "22023", "{bad:?}");
    assert!(bad.2.contains("invalid value for parameter"), "{bad:?}");
    let range = Raw::connect(proxy.addr(), &[("extra_float_digits", "9")])
        .await
        .err()
        .expect("refused");
    assert_eq!(range.1, "22023", "{range:?}");
    let url = format!("{}&options=-c%20lock_timeout%3Dsoon", proxy.url());
    let Err(e) = try_connect(&url).await else {
        panic!("accepted")
    };
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
    // Settings the proxy cannot keep across pooled connections are refused by name.
    let unk = Raw::connect(proxy.addr(), &[("work_mem", "64MB")])
        .await
        .err()
        .expect("refused");
    assert_eq!(unk.1, "0A000");
    assert!(unk.2.contains("work_mem"), "{unk:?}");
    let url = format!("{}&options=-c%20work_mem%3D64MB", proxy.url());
    let Err(e) = try_connect(&url).await else {
        panic!("accepted")
    };
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    // The server connection used for the checks is clean and serves.
    let c = proxy.client().await;
    assert_eq!(show(&c, "SHOW TimeZone").await, def["TimeZone"]);
    assert_eq!(show(&c, "SHOW lock_timeout").await, def["lock_timeout"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_applies_startup_values_once() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--pool-mode", "session"]).await;
    let url = format!("{}&options=-c%20TimeZone%3DAsia/Tokyo", proxy.url());
    let a = connect(&url).await;
    assert_eq!(show(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    a.batch_execute("SET TimeZone = 'Europe/Paris'")
        .await
        .unwrap();
    assert_eq!(show(&a, "SHOW TimeZone").await, "Europe/Paris");
    assert_eq!(show(&a, "SHOW TimeZone").await, "Europe/Paris");
    drop(a);
    let b = proxy.client().await;
    assert_eq!(show(&b, "SHOW TimeZone").await, def["TimeZone"]);
    proxy.shutdown().await;
}

/// Statements the server logged after the line containing `marker`.
fn logged_after(pg: &TempPostgres, marker: &str) -> Vec<String> {
    let log = std::fs::read_to_string(pg.dir().join("postgres.log")).expect("server log");
    let lines: Vec<&str> = log.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.contains(marker))
        .expect("marker logged");
    lines[from + 1..].iter().map(|l| l.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_injected_when_states_match() {
    let pg = tokio::task::spawn_blocking(|| {
        TempPostgres::builder()
            .setting("log_statement", "all")
            .spawn()
    })
    .await
    .unwrap();
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    for (apps, want_injections) in [(["same", "same"], false), (["one", "two"], true)] {
        let a = connect(&proxy.url_with_app(apps[0])).await;
        let b = connect(&proxy.url_with_app(apps[1])).await;
        let marker = format!("marker-{}-{}", apps[0], apps[1]);
        show(&a, &format!("SELECT '{marker}'")).await;
        for _ in 0..4 {
            show(&b, "SELECT 1").await;
            show(&a, "SELECT 1").await;
        }
        assert_eq!(show(&b, "SHOW application_name").await, apps[1]);
        assert_eq!(show(&a, "SHOW application_name").await, apps[0]);
        // The log is written asynchronously by the logging collector or stderr.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let injected = logged_after(&pg, &marker)
            .iter()
            .filter(|l| l.contains("set_config"))
            .count();
        if want_injections {
            assert!(injected >= 8, "{apps:?}: {injected} injected");
        } else {
            assert_eq!(injected, 0, "{apps:?}: {injected} injected");
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_batch_leaves_no_setting_behind() {
    let pg = cluster().await;
    let def = defaults(&pg).await;
    let direct = pg.client().await;
    let proxy = TestProxy::start(&pg, &txn_proxy_flags()).await;
    let mut a = Raw::connect(proxy.addr(), &[]).await.expect("startup");
    let a_pid = a.query("SELECT pg_backend_pid()").await.unwrap();
    // Pipelined: the SET commits on its own and the client leaves while the next query
    // runs, before the proxy could have read the setting back.
    a.send(&[
        "SET search_path = left_behind",
        "SELECT pg_sleep(30) /* leaving-mid-batch */",
    ])
    .await;
    let t0 = std::time::Instant::now();
    loop {
        let running = show(
            &direct,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%leaving-mid-batch */' \
             AND pid <> pg_backend_pid()",
        )
        .await;
        if running == "1" {
            break;
        }
        assert!(t0.elapsed() < T, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(a);
    let b = proxy.client().await;
    assert_eq!(show(&b, "SHOW search_path").await, def["search_path"]);
    assert_eq!(
        pid(&b).await,
        a_pid,
        "B runs on the server connection A left"
    );
    proxy.shutdown().await;
}

/// A SET whose new value cannot be read back (here the role may not read pg_settings, as
/// after a revoked grant; under faults: a server that dies right after the batch) is
/// never silently dropped: the client keeps its value, or its connection ends with 08006.
/// Before, the proxy forgot the change and the client's next statement ran without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_cannot_be_read_back_is_not_silently_lost() {
    let pg = cluster().await;
    pg.client()
        .await
        .batch_execute("CREATE ROLE app LOGIN; REVOKE SELECT ON pg_catalog.pg_settings FROM PUBLIC")
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-mode", "transaction", "--pool-size", "2"]).await;
    let (c, conn) =
        tokio_postgres::connect(&proxy.url_for("app", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let before = show(&c, "SHOW lock_timeout").await;
    assert_eq!(before, "0");
    c.batch_execute("SET lock_timeout = '20s'").await.unwrap();
    match tokio::time::timeout(T, c.simple_query("SHOW lock_timeout"))
        .await
        .expect("answered")
    {
        Ok(msgs) => {
            let v = msgs.into_iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            });
            assert_eq!(v.as_deref(), Some("20s"), "the client's SET was lost");
        }
        Err(e) => {
            // The session ended; the 08006 reaches the client as the answer to this query
            // or, when it came first, as the connection's own error.
            let ended = tokio::time::timeout(T, conn)
                .await
                .expect("connection task ends");
            let codes = [
                e.code().map(|c| c.code().to_owned()),
                ended
                    .unwrap()
                    .err()
                    .and_then(|f| f.code().map(|c| c.code().to_owned())),
            ];
            assert!(
                codes.iter().any(|c| c.as_deref() == Some("08006")),
                "the client is not told why its session ended: {e}, {codes:?}"
            );
        }
    }
}
