//! Liveness vs readiness, pause/resume, admin token and configuration reload, seen from
//! outside the proxy.
//!
//! Tests here read process-wide gauges and counters, so they take turns.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{TempPostgres, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// An admin request with an optional bearer token: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\
             Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in 10 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad response {text:?}"));
    (status, body.to_string())
}

/// Polls `path` until it answers `want`, up to `limit`; returns how long that took.
async fn wait_status(proxy: &TestProxy, path: &str, want: u16, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (status, body) = proxy.http_get(path).await;
        if status == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{path} still {status} ({body:?}) after {:?}, want {want}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(proxy: &TestProxy, series: &str) -> f64 {
    let (status, body) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200);
    metric(&body, series)
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<(String, String)> {
    e.as_db_error()
        .map(|d| (d.code().code().to_string(), d.message().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_upstream_while_healthz_stays_up() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--health-interval", "200ms"]).await;
    let up = wait_status(&proxy, "/readyz", 200, Duration::from_secs(5)).await;
    eprintln!("ready after {up:?}");

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    let down = wait_status(&proxy, "/readyz", 503, Duration::from_secs(2)).await;
    eprintln!("/readyz 503 {down:?} after the upstream stopped");
    let (status, body) = proxy.http_get("/readyz").await;
    assert_eq!((status, body.as_str()), (503, "upstream down\n"));
    assert_eq!(proxy.http_get("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(scrape(&proxy, "pgsluice_upstream_up{upstream=").await, 0.0);

    let pg = tokio::task::spawn_blocking(move || {
        pg.start();
        pg
    })
    .await
    .unwrap();
    let back = wait_status(&proxy, "/readyz", 200, Duration::from_secs(3)).await;
    eprintln!("/readyz 200 again {back:?} after the upstream restarted");
    assert_eq!(proxy.http_get("/healthz").await.0, 200);
    let c = proxy.client().await;
    c.batch_execute("SELECT 1")
        .await
        .expect("query after restart");
    proxy.shutdown().await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_queries_and_resume_releases_them() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(
        &pg,
        &["--health-interval", "200ms", "--queue-timeout", "1s"],
    )
    .await;
    wait_status(&proxy, "/readyz", 200, Duration::from_secs(5)).await;
    let c = proxy.client().await;
    c.batch_execute("SELECT 1").await.unwrap();

    let (status, body) = proxy.http_post("/pause").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"paused\":true"), "{body}");
    assert_eq!(
        proxy.http_get("/readyz").await,
        (503, "paused\n".to_string())
    );
    assert_eq!(scrape(&proxy, "pgsluice_paused").await, 1.0);

    // A query sent while paused waits, then runs once resumed.
    let held = tokio::spawn({
        let c = proxy.client().await;
        async move {
            let t0 = Instant::now();
            let r = c.simple_query("SELECT 7").await.map(|_| ());
            (r, t0.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "query ran while paused");
    assert_eq!(proxy.http_post("/resume").await.0, 200);
    let (r, took) = held.await.unwrap();
    r.expect("held query runs after resume");
    assert!(took >= Duration::from_millis(350), "did not wait: {took:?}");
    assert_eq!(proxy.http_get("/readyz").await.0, 200);
    assert_eq!(scrape(&proxy, "pgsluice_paused").await, 0.0);

    // Paused past the queue timeout: refused with 57P03, and the connection stays usable.
    assert_eq!(proxy.http_post("/pause").await.0, 200);
    let t0 = Instant::now();
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(
        sqlstate(&e),
        Some(("57P03".to_string(), "pgsluice: paused".to_string())),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "refused after {took:?}, queue timeout is 1s"
    );
    assert_eq!(proxy.http_post("/resume").await.0, 200);
    c.batch_execute("SELECT 1")
        .await
        .expect("usable after resume");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_mutating_routes_only() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--admin-token", "s3cret"]).await;
    let admin = proxy.admin_addr();
    for path in ["/pause", "/resume", "/reload"] {
        let (status, body) = http(admin, "POST", path, None).await;
        assert_eq!(status, 401, "{path} without token: {body}");
        let (status, body) = http(admin, "POST", path, Some("wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
    }
    assert_eq!(proxy.http_get("/pools").await.0, 200);
    // Refused requests changed nothing.
    let (_, pools) = proxy.http_get("/pools").await;
    assert!(pools.contains("\"paused\":false"), "{pools}");

    let (status, body) = http(admin, "POST", "/pause", Some("s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "{\"paused\":true}"));
    let (status, body) = http(admin, "POST", "/resume", Some("s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "{\"paused\":false}"));
    // Reading needs no token.
    for path in ["/metrics", "/healthz", "/pools"] {
        assert_eq!(http(admin, "GET", path, None).await.0, 200, "{path}");
    }
    proxy.shutdown().await;
}

fn limit_of(pools: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(pools).expect("/pools JSON");
    v["guard"]["limit"]
        .as_u64()
        .unwrap_or_else(|| panic!("no guard.limit in {pools}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_valid_file_and_keeps_the_old_one_otherwise() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgsluice.toml");
    std::fs::write(&file, "max-active = 2\n").unwrap();
    let path = file.to_str().unwrap();
    let proxy = TestProxy::start(&pg, &["--config", path]).await;
    let ok_series = "pgsluice_config_reloads_total{outcome=\"ok\"}";
    let err_series = "pgsluice_config_reloads_total{outcome=\"error\"}";
    let (ok0, err0) = (
        scrape(&proxy, ok_series).await,
        scrape(&proxy, err_series).await,
    );

    let c = proxy.client().await;
    c.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(limit_of(&proxy.http_get("/pools").await.1), 2);

    std::fs::write(&file, "max-active = 3\n").unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!((status, body.as_str()), (200, "{\"reloaded\":true}"));
    assert_eq!(limit_of(&proxy.http_get("/pools").await.1), 3);
    assert_eq!(scrape(&proxy, ok_series).await - ok0, 1.0);
    c.batch_execute("SELECT 2")
        .await
        .expect("same client after reload");

    std::fs::write(&file, "max-active = \"x\"\n").unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!(status, 500, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("error JSON");
    assert_eq!(v["reloaded"], false, "{body}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(path)),
        "{body}"
    );
    assert_eq!(limit_of(&proxy.http_get("/pools").await.1), 3);
    assert_eq!(scrape(&proxy, err_series).await - err0, 1.0);
    assert_eq!(scrape(&proxy, ok_series).await - ok0, 1.0);

    // The connection opened before both reloads still works.
    let n: i64 = c
        .query_one("SELECT 40 + 2::bigint", &[])
        .await
        .expect("same client after a failed reload")
        .get(0);
    assert_eq!(n, 42);
    proxy.shutdown().await;
}

/// A reload never switches pool mode under running sessions: the old mode stays (restart
/// for it) and the rest of the file applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_pool_mode() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgsluice.toml");
    std::fs::write(&file, "pool-mode = \"transaction\"\nmax-active = 2\n").unwrap();
    let proxy = TestProxy::start(&pg, &["--config", file.to_str().unwrap()]).await;
    let c = proxy.client().await;
    c.batch_execute("SELECT 1").await.unwrap();

    std::fs::write(&file, "pool-mode = \"session\"\nmax-active = 3\n").unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!((status, body.as_str()), (200, "{\"reloaded\":true}"));
    assert_eq!(limit_of(&proxy.http_get("/pools").await.1), 3);
    let console = common::connect(&proxy.url_for("postgres", "pgsluice")).await;
    let rows = console.simple_query("SHOW CONFIG").await.unwrap();
    let mode = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("pool_mode") => {
            r.get(1).map(str::to_string)
        }
        _ => None,
    });
    assert_eq!(mode.as_deref(), Some("transaction"));
    let n: i64 = c.query_one("SELECT 42::bigint", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    drop((c, console));
    proxy.shutdown().await;
}

/// `[databases.NAME]`: an alias logs in to its upstream dbname with its own pool size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_alias_has_its_own_name_and_pool_size() {
    let _turn = SERIAL.lock().await;
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgsluice.toml");
    std::fs::write(
        &file,
        "pool-size = 5\n[databases.app]\ndbname = \"postgres\"\npool-size = 2\n",
    )
    .unwrap();
    let proxy = TestProxy::start(&pg, &["--config", file.to_str().unwrap()]).await;
    let c = common::connect(&proxy.url_for("postgres", "app")).await;
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "postgres");
    let console = common::connect(&proxy.url_for("postgres", "pgsluice")).await;
    let rows = console.simple_query("SHOW DATABASES").await.unwrap();
    let app = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get("name") == Some("app") => Some((
            r.get("database").map(str::to_string),
            r.get("pool_size").map(str::to_string),
        )),
        _ => None,
    });
    assert_eq!(
        app,
        Some((Some("postgres".into()), Some("2".into()))),
        "{rows:?}"
    );
    drop((c, console));
    proxy.shutdown().await;
    // Bad entries stopping the start: `per_database bad_entries_stop_the_start_with_their_name`.
}
