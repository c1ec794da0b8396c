//! `pgsluice top --once` against a running proxy: the frame shows its pool, its limit and the
//! identity that is using it.

mod common;

use std::process::Command;

use common::{cluster, connect, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_shows_the_pool_and_identity_in_use() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--max-active", "3", "--pool-size", "3"]).await;
    let c = connect(&proxy.url_with_app("top-watcher")).await;
    for _ in 0..5 {
        c.batch_execute("SELECT 1").await.unwrap();
    }
    // A query running while top looks.
    let busy = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(1.5)").await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let admin = proxy.admin_addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .args(["top", "--once", "--interval", "300ms", "--admin", &admin])
            .output()
            .expect("run pgsluice top")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("active 1/3"), "{text}");
    let pool = text
        .lines()
        .find(|l| l.contains("postgres/postgres"))
        .unwrap_or_else(|| panic!("no pool line in:\n{text}"));
    assert!(pool.contains("1/3"), "one lease of three: {pool}");
    assert!(text.lines().any(|l| l.contains("top-watcher")), "{text}");
    busy.await.unwrap().unwrap();

    // A proxy that is not there: a clear error, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["top", "--once", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin API"));
    proxy.shutdown().await;
}
