//! Upstream faults injected between the proxy and a real PostgreSQL: crash, hang, network
//! cuts mid-transaction and mid-COPY, and a flapping link. Each test states what a client
//! observes; docs/RELIABILITY.md summarises the findings.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, connect, try_connect, FaultShim, Mode, TestProxy};
use futures::SinkExt;
use tokio_postgres::Client;

/// `cargo test` runs these in one process; the fd count in the flapping test is process-wide,
/// so the tests here take turns (nextest runs each in its own process anyway).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shim_url(shim: &FaultShim) -> String {
    format!("postgres://postgres@{}/postgres", shim.addr())
}

/// SQLSTATE of an error, or "conn" when the client saw no server error (socket closed).
fn code_of(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| "conn".into())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Retries `SELECT 1` through a fresh connection until it works or `within` passes.
async fn wait_serving(url: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let attempt = async {
            let c = try_connect(url).await.ok()?;
            c.simple_query("SELECT 1").await.ok()
        };
        if tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "proxy did not serve again within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_under_load_errors_promptly_then_recovers() {
    let _serial = SERIAL.lock().await;
    let pg = Arc::new(cluster().await);
    let shim = FaultShim::start(pg.addr()).await;
    let proxy = TestProxy::start_upstream(
        &shim_url(&shim),
        &[
            "--pool-size",
            "4",
            "--connect-timeout",
            "1s",
            "--health-interval",
            "200ms",
            "--breaker-cooldown",
            "300ms",
            // Queries waiting for a pool checkout when the upstream dies wait out this timeout.
            "--queue-timeout",
            "2s",
        ],
    )
    .await;
    let url = proxy.url();
    let killed_at: Arc<parking_lot::Mutex<Option<Instant>>> = Default::default();

    let mut clients = Vec::new();
    for _ in 0..10 {
        let c = connect(&url).await;
        let killed_at = killed_at.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok_before, mut shed) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.simple_query("SELECT pg_sleep(0.01)"),
                )
                .await;
                match r {
                    Err(_) => return Err("query hung for 10s".to_string()),
                    Ok(Ok(_)) => ok_before += 1,
                    // Shed by the standing-queue rule: the query never ran, carry on.
                    Ok(Err(e)) if code_of(&e) == "53400" => shed += 1,
                    Ok(Err(e)) => {
                        let at = (*killed_at.lock()).ok_or_else(|| {
                            format!("error before the kill: {} {e:?}", code_of(&e))
                        })?;
                        return Ok((code_of(&e), at.elapsed(), ok_before, shed));
                    }
                }
            }
            Err("no error within 15s".to_string())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    *killed_at.lock() = Some(Instant::now());
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.kill_immediate())
        .await
        .unwrap();

    let mut codes = Vec::new();
    let mut total_shed = 0;
    for h in clients {
        let (code, after, ok_before, shed) = h.await.unwrap().unwrap();
        eprintln!("client: {code} {after:?} after the kill");
        total_shed += shed;
        assert!(ok_before > 0, "client never ran a query before the kill");
        assert!(
            after < Duration::from_secs(5),
            "error came {after:?} after the kill"
        );
        assert!(
            ["08006", "57P03", "57P01", "conn"].contains(&code.as_str()),
            "unexpected error {code}"
        );
        codes.push(code);
    }
    eprintln!("errors after upstream kill: {codes:?}; 53400 sheds along the way: {total_shed}");

    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.start())
        .await
        .unwrap();
    let took = wait_serving(&url, Duration::from_secs(15)).await;
    eprintln!("serving again {took:?} after upstream restart");
    proxy.shutdown().await;
}

/// Clients waiting for admission in this proxy, from its /pools endpoint.
async fn waiting(proxy: &TestProxy) -> u64 {
    let (_, body) = proxy.http_get("/pools").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("/pools is JSON");
    v["clients"]["waiting"].as_u64().expect("clients.waiting")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stall_times_out_and_flips_readiness() {
    let _serial = SERIAL.lock().await;
    let pg = cluster().await;
    let shim = FaultShim::start(pg.addr()).await;
    let proxy = TestProxy::start_upstream(
        &shim_url(&shim),
        &[
            "--pool-size",
            "2",
            "--max-queue",
            "4",
            "--query-timeout",
            "500ms",
            "--queue-timeout",
            "500ms",
            "--connect-timeout",
            "1s",
            "--cancel-grace",
            "500ms",
            "--health-interval",
            "200ms",
        ],
    )
    .await;
    let url = proxy.url();
    // Warm both pooled connections so the stall hits established servers.
    let warm: Vec<Client> = vec![connect(&url).await, connect(&url).await];
    for c in &warm {
        c.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(proxy.http_get("/readyz").await.0, 200);

    shim.set_mode(Mode::Stall);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(8), c.simple_query("SELECT 1")).await;
            eprintln!(
                "stall client: {:?} after {:?}",
                r.as_ref().map(|r| r.as_ref().map_err(code_of).map(|_| ())),
                t.elapsed()
            );
            (
                r.map(|r| r.map_err(|e| code_of(&e)).map(|_| ())),
                t.elapsed(),
            )
        }));
    }
    let mut peak_queue = 0;
    for _ in 0..40 {
        peak_queue = peak_queue.max(waiting(&proxy).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut seen = Vec::new();
    for t in tasks {
        let (r, took) = t.await.unwrap();
        let code = match r {
            Err(_) => panic!("query still hanging after 8s of stalled upstream"),
            Ok(Ok(())) => panic!("query succeeded against a stalled upstream"),
            Ok(Err(code)) => code,
        };
        assert!(took < Duration::from_secs(5), "{code} took {took:?}");
        assert!(
            ["57014", "53400", "08006", "57P03"].contains(&code.as_str()),
            "unexpected {code}"
        );
        seen.push((code, took.as_millis()));
    }
    eprintln!("stalled upstream, (code, ms) per client: {seen:?}; peak queue {peak_queue}");
    assert!(peak_queue <= 4, "queue grew past --max-queue: {peak_queue}");

    let (health, _) = proxy.http_get("/healthz").await;
    assert_eq!(health, 200, "liveness must not depend on the upstream");
    let start = Instant::now();
    loop {
        let (ready, _) = proxy.http_get("/readyz").await;
        if ready == 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/readyz stayed {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    shim.set_mode(Mode::Pass);
    let took = wait_serving(&url, Duration::from_secs(15)).await;
    eprintln!("serving again {took:?} after the stall ended");
    let start = Instant::now();
    while proxy.http_get("/readyz").await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/readyz stayed 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(warm);
    proxy.shutdown().await;
}

async fn count(direct: &Client, table: &str) -> i64 {
    direct
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_mid_transaction_loses_nothing_committed() {
    let _serial = SERIAL.lock().await;
    let pg = cluster().await;
    let direct = pg.client().await;
    direct
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let shim = FaultShim::start(pg.addr()).await;
    let proxy = TestProxy::start_upstream(&shim_url(&shim), &["--pool-size", "2"]).await;

    let c = proxy.client().await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    shim.cut_all_wait().await;
    let err = tokio::time::timeout(Duration::from_secs(5), c.batch_execute("COMMIT"))
        .await
        .expect("COMMIT hung after the cut")
        .expect_err("COMMIT after a cut must fail");
    eprintln!("COMMIT after cut: {} ({err})", code_of(&err));
    assert_eq!(
        count(&direct, "t").await,
        0,
        "uncommitted row became visible"
    );

    wait_serving(&proxy.url(), Duration::from_secs(10)).await;
    let c = proxy.client().await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    assert_eq!(count(&direct, "t").await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_mid_copy_is_all_or_nothing() {
    let _serial = SERIAL.lock().await;
    let pg = cluster().await;
    let direct = pg.client().await;
    direct
        .batch_execute("CREATE TABLE c (x int)")
        .await
        .unwrap();
    let shim = FaultShim::start(pg.addr()).await;
    let proxy = TestProxy::start_upstream(&shim_url(&shim), &["--pool-size", "2"]).await;

    const CHUNKS: usize = 400;
    const ROWS: usize = 500;
    let c = proxy.client().await;
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..ROWS {
        chunk.push_str(&format!("{i}\n"));
    }
    let chunk = bytes::Bytes::from(chunk);
    let copy = async {
        for i in 0..CHUNKS {
            if i == CHUNKS / 4 {
                shim.cut_all();
            }
            sink.send(chunk.clone()).await?;
        }
        sink.finish().await
    };
    let r = tokio::time::timeout(Duration::from_secs(10), copy)
        .await
        .expect("COPY hung after the cut");
    let n = count(&direct, "c").await;
    eprintln!(
        "COPY after cut: {:?}; rows {n}",
        r.as_ref().map_err(code_of)
    );
    assert!(
        n == 0 || n == (CHUNKS * ROWS) as i64,
        "partial COPY visible: {n} rows"
    );
    assert!(r.is_err(), "COPY across a cut reported success");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_upstream_settles_without_leaking_fds() {
    let _serial = SERIAL.lock().await;
    let pg = cluster().await;
    let shim = Arc::new(FaultShim::start(pg.addr()).await);
    let proxy = TestProxy::start_upstream(
        &shim_url(&shim),
        &[
            "--pool-size",
            "4",
            "--connect-timeout",
            "500ms",
            "--query-timeout",
            "1s",
            "--queue-timeout",
            "1s",
            "--cancel-grace",
            "300ms",
            "--health-interval",
            "200ms",
            "--breaker-cooldown",
            "200ms",
            "--breaker-max-cooldown",
            "1s",
        ],
    )
    .await;
    let url = proxy.url();
    {
        // Warm the pool to its full size, then measure.
        let cs: Vec<Client> = futures::future::join_all((0..4).map(|_| connect(&url))).await;
        futures::future::join_all(cs.iter().map(|c| c.simple_query("SELECT pg_sleep(0.1)"))).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = open_fds();

    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..6 {
        let (url, stop) = (url.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.as_ref().map_or(true, |c| c.is_closed()) {
                    client = tokio::time::timeout(Duration::from_secs(2), try_connect(&url))
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                let good = match &client {
                    Some(c) => matches!(
                        tokio::time::timeout(Duration::from_secs(3), c.simple_query("SELECT 1"))
                            .await,
                        Ok(Ok(_))
                    ),
                    None => false,
                };
                if good {
                    ok += 1;
                } else {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            (ok, failed)
        }));
    }
    for _ in 0..4 {
        shim.set_mode(Mode::Blackhole);
        shim.cut_all();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        shim.set_mode(Mode::Pass);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut totals = (0, 0);
    for l in loops {
        let (ok, failed) = tokio::time::timeout(Duration::from_secs(10), l)
            .await
            .expect("client loop stuck")
            .unwrap();
        totals = (totals.0 + ok, totals.1 + failed);
    }
    eprintln!("flapping: {} queries ok, {} failed", totals.0, totals.1);
    assert!(
        totals.0 > 0 && totals.1 > 0,
        "flapping had no visible effect"
    );

    let took = wait_serving(&url, Duration::from_secs(10)).await;
    eprintln!("serving {took:?} after the link settled");
    // The loops' clients are gone; the proxy must close what they left behind.
    let start = Instant::now();
    let margin = 6;
    let mut now = open_fds();
    while now > baseline + margin && start.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = open_fds();
    }
    eprintln!("open fds: baseline {baseline}, after flapping {now}");
    assert!(now <= baseline + margin, "fds {now} vs baseline {baseline}");
    proxy.shutdown().await;
}

/// The backend dies while the client is still sending a batch (here a large Bind): the
/// client gets 08006 for that batch, and its next transaction runs whole on one server.
/// Before, the dead server's FATAL (removed: nothing was owed yet) left a flag set, and
/// the next batch's server was dropped after it: a `BEGIN` answered `T` and the client's
/// following statements ran outside any transaction, each committed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lost_mid_batch_leaves_the_next_transaction_whole() {
    let _serial = SERIAL.lock().await;
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-mode", "transaction", "--pool-size", "2"]).await;
    let direct = pg.client().await;
    let mut c = common::raw::RawClient::connect(proxy.addr()).await;
    // Learn the backend the next batch lands on: the one that just served this client.
    let got = c.query("SELECT pg_backend_pid()").roundtrip().await;
    let pid = common::raw::rows(&got).first().cloned().expect("a pid row");
    let big = "x".repeat(4 << 20);
    c.parse("", "SELECT length($1::text)")
        .bind("", &[big.as_str()])
        .execute()
        .sync();
    let half = c.queued() / 2;
    c.send_first(half).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    direct
        .execute(&format!("SELECT pg_terminate_backend({pid})"), &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = c.roundtrip().await;
    let errs = common::raw::errors(&got);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("08006") || e.starts_with("57P01")),
        "the interrupted batch fails: {got:?}"
    );
    assert!(
        matches!(got.last(), Some(common::raw::Got::Ready(b'I'))),
        "{got:?}"
    );
    // A whole transaction afterwards: every statement inside it, one backend.
    let got = c.query("BEGIN").roundtrip().await;
    assert!(
        matches!(got.last(), Some(common::raw::Got::Ready(b'T'))),
        "{got:?}"
    );
    let first = c.query("SELECT pg_backend_pid()").roundtrip().await;
    assert!(
        matches!(first.last(), Some(common::raw::Got::Ready(b'T'))),
        "a statement after BEGIN ran outside the transaction: {first:?}"
    );
    let second = c.query("SELECT pg_backend_pid()").roundtrip().await;
    assert_eq!(
        common::raw::rows(&first),
        common::raw::rows(&second),
        "the transaction moved between backends"
    );
    let got = c.query("COMMIT").roundtrip().await;
    assert!(
        matches!(got.last(), Some(common::raw::Got::Ready(b'I'))),
        "{got:?}"
    );
}
