//! A real Prometheus server scrapes the admin endpoint and can query pgsluice's series.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::http_request;
use common::{TempPostgres, TestProxy};

/// Kills the server when the test ends, however it ends.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then_some(path)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

fn start_prometheus(bin: &str, dir: &std::path::Path, target: SocketAddr) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: pgsluice\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr }
}

/// The `data.result` vector of an instant query, or None while Prometheus is not answering.
async fn query(prom: SocketAddr, promql: &str) -> Option<Vec<serde_json::Value>> {
    tokio::net::TcpStream::connect(prom).await.ok()?;
    let (status, body) = http_request(prom, "GET", &format!("/api/v1/query?query={promql}")).await;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"].as_array().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_endpoint() {
    let Some(bin) = prometheus_binary() else {
        eprintln!("SKIP: no `prometheus` binary on PATH; install it to run this test");
        return;
    };
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--health-interval", "200ms"]).await;
    let c = proxy.client().await;
    for i in 0..5 {
        c.batch_execute(&format!("SELECT {i}")).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(&bin, dir.path(), proxy.admin_addr());
    let t0 = Instant::now();
    let mut found = Vec::new();
    while t0.elapsed() < Duration::from_secs(18) {
        if let Some(r) = query(prom.addr, "pgsluice_active_queries").await {
            if !r.is_empty() {
                found = r;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("series after {:?}: {found:?}", t0.elapsed());
    assert!(
        !found.is_empty(),
        "Prometheus had no pgsluice_active_queries after 18 s"
    );
    assert!(
        found
            .iter()
            .any(|s| s["metric"]["pool"] == "postgres/postgres" && s["metric"]["job"] == "pgsluice"),
        "{found:?}"
    );
    // The scrape itself succeeded and the counters came through as numbers.
    let up = query(prom.addr, "up").await.unwrap_or_default();
    assert!(
        up.iter().any(|s| s["value"][1] == "1"),
        "scrape target not up: {up:?}"
    );
    let ok = query(prom.addr, "pgsluice_queries_total")
        .await
        .unwrap_or_default();
    let total: f64 = ok
        .iter()
        .filter(|s| s["metric"]["outcome"] == "ok")
        .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        .sum();
    assert!(total >= 5.0, "queries_total ok = {total}: {ok:?}");
    drop(prom);
    proxy.shutdown().await;
}
