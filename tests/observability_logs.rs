//! The real binary: JSON logs on stderr, SIGHUP reload and SIGTERM shutdown.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::http_request;
use common::{connect, TempPostgres};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

/// Waits for the child to exit, killing it after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (status, body) = http_request(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Starts the binary on free loopback ports with stderr captured by a reader thread.
fn spawn(args: &[&str]) -> (Child, std::thread::JoinHandle<String>, u16, SocketAddr) {
    let (port, admin_port) = (free_port(), free_port());
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &admin.to_string()])
        .args(args)
        .env_remove("PGSLUICE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgsluice");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    (child, reader, port, admin)
}

/// Ready once the upstream answered a health check.
async fn wait_ready(child: &mut Child, admin: SocketAddr) {
    let t0 = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_request(admin, "GET", "/readyz").await.0 == 200
        {
            return;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("not ready in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop(mut child: Child, reader: std::thread::JoinHandle<String>) -> String {
    signal(&child, libc::SIGTERM);
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    let logs = reader.join().expect("stderr reader");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}:\n{logs}"
    );
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_sighup_reload_and_sigterm() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgsluice.toml");
    std::fs::write(&file, "max-active = 2\n").unwrap();
    let (mut child, reader, port, admin) = spawn(&[
        "--upstream",
        &pg.url(),
        "--log-format",
        "json",
        "--health-interval",
        "200ms",
        "--queue-timeout",
        "300ms",
        "--config",
        file.to_str().unwrap(),
    ]);
    let t0 = Instant::now();
    wait_ready(&mut child, admin).await;

    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?application_name=logtest");
    eprintln!("ready after {:?}", t0.elapsed());
    let c = connect(&url).await;
    c.batch_execute("SELECT 1").await.unwrap();

    // A refusal while paused, so a session-level line is logged.
    assert_eq!(http_request(admin, "POST", "/pause").await.0, 200);
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    let code = e.as_db_error().map(|d| d.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57P03"), "{e:?}");
    assert_eq!(http_request(admin, "POST", "/resume").await.0, 200);

    std::fs::write(&file, "max-active = 5\n").unwrap();
    signal(&child, libc::SIGHUP);
    let series = "pgsluice_config_reloads_total{outcome=\"ok\"}";
    let t0 = Instant::now();
    while metric(admin, series).await < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "SIGHUP not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, pools) = http_request(admin, "GET", "/pools").await;
    let v: serde_json::Value = serde_json::from_str(&pools).unwrap();
    assert_eq!(v["guard"]["limit"], 5, "{pools}");
    c.batch_execute("SELECT 2")
        .await
        .expect("client kept across SIGHUP");
    drop(c);

    let stopping = Instant::now();
    let logs = stop(child, reader).await;
    eprintln!("exited {:?} after SIGTERM", stopping.elapsed());

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    eprintln!("{} JSON log lines", lines.len());
    for l in &lines {
        assert!(l["timestamp"].is_string(), "{l}");
        assert!(l["level"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    let has = |msg: &str| lines.iter().any(|l| l["fields"]["message"] == msg);
    for msg in [
        "pgsluice listening",
        "upstream is up",
        "configuration reloaded",
        "paused by admin request",
        "resumed by admin request",
        "stopped",
    ] {
        assert!(has(msg), "no {msg:?} line in:\n{logs}");
    }
    let shed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "query shed")
        .unwrap_or_else(|| panic!("no shed line in:\n{logs}"));
    assert_eq!(shed["level"], "WARN", "{shed}");
    assert_eq!(shed["fields"]["identity"], "logtest", "{shed}");
    assert_eq!(shed["fields"]["reason"], "paused", "{shed}");
    // No per-client span (it cost every poll an enter/exit): the line names its identity.
    assert!(shed.get("span").is_none(), "{shed}");
}

/// Text logs to a pipe carry no colour codes, and a pool's connection gauges are in the first
/// scrape after its first query (the health loop, which also samples them, is 60 s away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_are_plain_and_gauges_are_fresh_at_scrape() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let (mut child, reader, port, admin) = spawn(&[
        "--upstream",
        &pg.url(),
        "--log-format",
        "text",
        "--health-interval",
        "60s",
    ]);
    wait_ready(&mut child, admin).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let c = connect(&url).await;
    c.batch_execute("SELECT 1").await.unwrap();
    let idle = metric(
        admin,
        "pgsluice_server_connections{pool=\"postgres/postgres\",state=\"idle\"}",
    )
    .await;
    assert_eq!(idle, 1.0, "the pooled connection is idle after the query");
    drop(c);
    let logs = stop(child, reader).await;
    assert!(logs.contains("upstream is up"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escape in piped logs:\n{logs}"
    );
}
