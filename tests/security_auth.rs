//! Client authentication through the proxy (SCRAM-SHA-256 and MD5 against a users file) and
//! the admin API's token rule, against a real PostgreSQL.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{TempPostgres, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "s3cret-pw";

fn users_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp users file");
    writeln!(f, "postgres:{PASSWORD}").unwrap();
    f
}

fn url(proxy: &TestProxy, user: &str, password: &str) -> String {
    format!(
        "postgres://{user}:{password}@{}/postgres?connect_timeout=10",
        proxy.addr()
    )
}

/// Connects and runs one query; on failure returns (SQLSTATE, message).
async fn login(url: &str) -> Result<(), (String, String)> {
    match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            let v: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
            assert_eq!(v, 7);
            Ok(())
        }
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("not a server error: {e}"));
            Err((db.code().code().to_owned(), db.message().to_owned()))
        }
    }
}

async fn check_method(method: &str) {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let users = users_file();
    let proxy = TestProxy::start(
        &pg,
        &["--auth", method, "--users", users.path().to_str().unwrap()],
    )
    .await;

    login(&url(&proxy, "postgres", PASSWORD))
        .await
        .unwrap_or_else(|e| panic!("{method}: right password refused: {e:?}"));

    let (code, wrong_msg) = login(&url(&proxy, "postgres", "nope")).await.unwrap_err();
    assert_eq!(code, "28P01", "{method} wrong password: {wrong_msg}");
    assert_eq!(
        wrong_msg,
        "password authentication failed for user \"postgres\""
    );

    let (code, unknown_msg) = login(&url(&proxy, "mallory", "nope")).await.unwrap_err();
    assert_eq!(code, "28P01", "{method} unknown user: {unknown_msg}");
    // Same shape: only the user name differs.
    assert_eq!(
        unknown_msg,
        wrong_msg.replace("\"postgres\"", "\"mallory\"")
    );

    // Timing: a failed login must not reveal whether the user exists.
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert!(login(&url(&proxy, "mallory", "nope")).await.is_err());
        unknown.push(t.elapsed());
        let t = Instant::now();
        assert!(login(&url(&proxy, "postgres", "nope")).await.is_err());
        wrong.push(t.elapsed());
    }
    let (mu, mw) = (median(&mut unknown), median(&mut wrong));
    let ratio = mu.as_secs_f64() / mw.as_secs_f64();
    eprintln!("{method}: median unknown-user {mu:?}, wrong-password {mw:?}, ratio {ratio:.2}");
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{method}: unknown {mu:?} vs wrong {mw:?}"
    );
    proxy.shutdown().await;
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_scram_wrong_unknown_right() {
    check_method("scram-sha-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_md5_wrong_unknown_right() {
    check_method("md5").await;
}

/// POST with an optional bearer token; returns the status code.
async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("admin answered in time")
        .expect("admin exchange");
    let head = String::from_utf8_lossy(&raw);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("malformed response {head:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_admin_token_rule() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();

    let open = TestProxy::start(&pg, &[]).await;
    assert_eq!(post(open.admin_addr(), "/pause", None).await, 200);
    assert_eq!(open.http_get("/readyz").await.0, 503, "paused is not ready");
    assert_eq!(post(open.admin_addr(), "/resume", None).await, 200);
    open.shutdown().await;

    let guarded = TestProxy::start(&pg, &["--admin-token", "t0ken"]).await;
    let admin = guarded.admin_addr();
    let start = Instant::now();
    while guarded.http_get("/readyz").await.0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post(admin, "/pause", None).await, 401);
    assert_eq!(post(admin, "/pause", Some("wrong")).await, 401);
    assert_eq!(
        guarded.http_get("/readyz").await.0,
        200,
        "refused pause took effect"
    );
    assert_eq!(post(admin, "/pause", Some("t0ken")).await, 200);
    assert_eq!(guarded.http_get("/readyz").await.0, 503);
    assert_eq!(post(admin, "/resume", Some("t0ken")).await, 200);
    guarded.shutdown().await;
}
