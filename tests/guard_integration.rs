//! The concurrency guard against a real PostgreSQL: the active-query cap, shedding, fair
//! shares between identities, the circuit breaker, and edge cases.

// Each test binary uses a subset of the shared helpers.
mod common;
#[path = "guard_integration/load.rs"]
mod load;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, try_connect, TempPostgres, TestProxy};
use load::{join_all, spawn_loopers, Tally};
use tokio_postgres::error::SqlState;

/// Running pg_sleep statements, other than the asking session.
async fn active_sleeps(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("query pg_stat_activity")
        .get(0)
}

fn median(v: &mut [Duration]) -> Duration {
    assert!(!v.is_empty(), "no samples");
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_queries_never_exceed_the_cap() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--max-active", "4", "--pool-size", "16"]).await;
    let direct = pg.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let tasks = spawn_loopers(&proxy, "cap", 40, "SELECT pg_sleep(0.2)", &stop, &tally).await;
    let t0 = Instant::now();
    let mut max_seen = 0;
    let mut samples = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        let n = active_sleeps(&direct).await;
        max_seen = max_seen.max(n);
        samples += 1;
        assert!(n <= 4, "{n} pg_sleep queries active with --max-active 4");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let lat = join_all(tasks).await;
    let (ok, shed, unavailable, other) = tally.get();
    println!(
        "cap: samples={samples} max_active_seen={max_seen} ok={ok} shed={shed} \
         unavailable={unavailable} other={other}"
    );
    assert_eq!(other, 0, "errors other than 53400/57P03");
    assert!(
        max_seen >= 3,
        "the cap was never approached (max {max_seen})"
    );
    // 4 slots x 4 s / 0.2 s = 80 at best; half of that shows the slots were kept busy.
    assert!(ok >= 40, "only {ok} queries completed");
    assert_eq!(lat.len() as u64, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_is_shed_fast_with_a_hint() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "2",
            "--max-queue",
            "4",
            "--queue-timeout",
            "300ms",
            "--pool-size",
            "4",
        ],
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(Arc::new(proxy.client().await));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(30));
    let mut tasks = Vec::new();
    for c in &clients {
        let (c, barrier) = (c.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let t = Instant::now();
            let res = c.simple_query("SELECT pg_sleep(1)").await;
            (res, t.elapsed())
        }));
    }
    let mut ok = 0;
    let mut shed_times = Vec::new();
    let mut shed_clients = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (res, took) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("query hung")
            .unwrap();
        match res {
            Ok(_) => ok += 1,
            Err(e) => {
                let db = e
                    .as_db_error()
                    .unwrap_or_else(|| panic!("not a server error: {e:?}"));
                assert_eq!(db.code(), &SqlState::CONFIGURATION_LIMIT_EXCEEDED, "{db:?}");
                assert!(
                    db.message().starts_with("pgsluice: database busy"),
                    "{db:?}"
                );
                let hint = db.hint().unwrap_or_default();
                assert!(
                    hint.contains("active") && hint.contains("/2"),
                    "hint lacks active/limit: {hint:?}"
                );
                // 300 ms queue timeout plus slack for a loaded machine; a query that ran
                // would take at least 1 s.
                assert!(took < Duration::from_millis(900), "shed after {took:?}");
                shed_times.push(took);
                shed_clients.push(i);
            }
        }
    }
    let slowest = shed_times.iter().max().copied().unwrap_or_default();
    println!(
        "shed: ok={ok} shed={} slowest_shed={slowest:?}",
        shed_times.len()
    );
    assert!(
        (1..=2).contains(&ok),
        "{ok} queries ran with --max-active 2"
    );
    assert_eq!(ok + shed_times.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_identity_is_not_starved() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "4",
            "--pool-size",
            "8",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ta, tb) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let a = spawn_loopers(&proxy, "A", 40, "SELECT pg_sleep(0.05)", &stop, &ta).await;
    let b = spawn_loopers(&proxy, "B", 2, "SELECT pg_sleep(0.05)", &stop, &tb).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut la, mut lb) = (join_all(a).await, join_all(b).await);
    let (a_ok, a_shed, _, a_other) = ta.get();
    let (b_ok, b_shed, _, b_other) = tb.get();
    let (ma, mb) = (median(&mut la), median(&mut lb));
    println!(
        "fairness: A ok={a_ok} shed={a_shed} median={ma:?} {:?}; B ok={b_ok} shed={b_shed} median={mb:?} {:?}",
        ta.reasons.lock(),
        tb.reasons.lock()
    );
    assert_eq!(a_other + b_other, 0);
    // A saturates the limit: its queries wait (a queue ten deep per slot) but nobody gives
    // up, so the queue is stable and nothing is refused: A's pain shows as latency.
    assert_eq!(
        a_shed,
        0,
        "a stable queue was shed: {:?}",
        ta.reasons.lock()
    );
    assert!(
        ma >= Duration::from_millis(200),
        "A median {ma:?}: A never saturated the limit"
    );
    assert!(
        ma >= Duration::from_millis(45),
        "A median {ma:?} below the query time"
    );
    // One query takes 50 ms; B waits at most for the next slot to free (~12 ms at 4 slots).
    assert!(
        mb < Duration::from_millis(120),
        "B median latency {mb:?} (query 50 ms)"
    );
    // B's two clients run nearly back to back: 2 x 4 s / 50 ms = 160 at most.
    assert!(b_ok >= 80, "B completed only {b_ok}");
    assert_eq!(b_shed, 0, "B was shed: {:?}", tb.reasons.lock());
}

/// Runs `a_clients` of identity A (weight 3) and `b_clients` of B (weight 1) looping `sql`
/// against `--max-active 4`; returns completions of each over 4 s and their shed counts.
async fn share_split(a_clients: usize, b_clients: usize, sql: &'static str) -> [u64; 4] {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "4",
            "--pool-size",
            "8",
            "--queue-timeout",
            "30s",
            "--share",
            "A=3",
            "--share",
            "B=1",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ta, tb) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let a = spawn_loopers(&proxy, "A", a_clients, sql, &stop, &ta).await;
    let b = spawn_loopers(&proxy, "B", b_clients, sql, &stop, &tb).await;
    // Let the queues build before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a0, b0) = (ta.get().0, tb.get().0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (a1, b1) = (ta.get().0, tb.get().0);
    stop.store(true, Ordering::Relaxed);
    join_all(a).await;
    join_all(b).await;
    let (_, a_shed, _, a_other) = ta.get();
    let (_, b_shed, _, b_other) = tb.get();
    assert_eq!(a_other + b_other, 0);
    [a1 - a0, b1 - b0, a_shed, b_shed]
}

fn check_ratio(what: &str, [na, nb, a_shed, b_shed]: [u64; 4]) {
    let ratio = na as f64 / nb.max(1) as f64;
    println!("{what}: A={na} B={nb} ratio={ratio:.2} (A shed {a_shed}, B shed {b_shed})");
    assert!(nb >= 20, "B completed only {nb}");
    assert!(
        (2.7..=3.3).contains(&ratio),
        "A:B = {na}:{nb} = {ratio:.2}, want 3 +- 10%"
    );
}

/// Both identities keep waiters queued at all times, but few enough that waits stay under
/// the standing-queue target and little is shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_shares_split_capacity() {
    check_ratio("shares", share_split(6, 2, "SELECT pg_sleep(0.02)").await);
}

/// 20 clients each on 4 slots: a deep but stable queue (nobody gives up, so nothing is
/// shed), and the weights still split the capacity 3:1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_shares_under_heavy_backlog() {
    check_ratio(
        "shares-heavy",
        share_split(20, 20, "SELECT pg_sleep(0.05)").await,
    );
}

const BREAKER_FLAGS: &[&str] = &[
    "--pool-size",
    "4",
    "--breaker-threshold",
    "3",
    "--breaker-cooldown",
    "500ms",
    "--health-interval",
    "200ms",
    "--connect-timeout",
    "1s",
];

fn code_of(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

async fn circuit_state(proxy: &TestProxy) -> String {
    let (status, body) = proxy.http_get("/pools").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("pools JSON");
    v["guard"]["circuit"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_opens_fails_fast_and_recovers() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, BREAKER_FLAGS).await;
    let inflight = Arc::new(proxy.client().await);
    let probe = proxy.client().await;
    probe.simple_query("SELECT 1").await.unwrap();
    assert_eq!(circuit_state(&proxy).await, "closed");
    let runner = {
        let c = inflight.clone();
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| pg.kill_immediate());

    let res = tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("in-flight query hung after the upstream died")
        .unwrap();
    let err = res.expect_err("in-flight query cannot succeed");
    println!("in-flight query: {:?}", err.as_db_error());
    assert!(
        matches!(code_of(&err).as_str(), "" | "08006" | "57P01" | "57P02"),
        "in-flight error {err:?}"
    );

    // Failed health checks open the breaker (3 x 200 ms).
    let t0 = Instant::now();
    while circuit_state(&proxy).await != "open" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("breaker open {:?} after the in-flight error", t0.elapsed());

    // While open, queries are refused at once with 57P03.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(3), probe.simple_query("SELECT 1"))
            .await
            .expect("query hung while the circuit is open")
            .expect_err("query succeeded with the upstream down");
        slowest = slowest.max(t.elapsed());
        if code_of(&e) == "57P03" {
            assert!(
                e.as_db_error()
                    .is_some_and(|d| d.message().starts_with("pgsluice: upstream unavailable")),
                "{e:?}"
            );
        } else {
            // A half-open trial is let through; it fails on the dead upstream.
            assert_eq!(code_of(&e), "08006", "{e:?}");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    println!("slowest refusal while open: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(300),
        "refusal took {slowest:?}"
    );

    let (status, metrics) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200);
    let gauge: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pgsluice_circuit_state{"))
        .collect();
    assert!(
        gauge.iter().any(|l| l.ends_with(" 2")),
        "circuit gauge not 2: {gauge:?}"
    );

    tokio::task::block_in_place(|| pg.start());
    let t0 = Instant::now();
    loop {
        let Err(e) = probe.simple_query("SELECT 1").await else {
            break;
        };
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no recovery within 10 s: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("recovered {:?} after restart", t0.elapsed());
    // The client whose query was lost carries on too.
    let rows = inflight.simple_query("SELECT 2").await.unwrap();
    assert!(rows.len() >= 2);
    assert_eq!(circuit_state(&proxy).await, "closed");
}

/// Before the breaker opens, a query needing a new server connection must fail with 08006
/// as soon as the connect fails, not wait out the queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_fail_fast_before_breaker_opens() {
    let pg = cluster().await;
    // Long health interval and high threshold: the breaker stays closed for this test.
    let flags = [
        "--pool-size",
        "4",
        "--health-interval",
        "30s",
        "--breaker-threshold",
        "100",
        "--connect-timeout",
        "1s",
    ];
    let proxy = TestProxy::start(&pg, &flags).await;
    let c = proxy.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    tokio::task::block_in_place(|| pg.kill_immediate());
    for i in 0..5 {
        let t = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), c.simple_query("SELECT 1"))
            .await
            .expect("query hung")
            .expect_err("upstream is down");
        let took = t.elapsed();
        println!("attempt {i}: {:?} after {took:?}", e.as_db_error());
        assert_eq!(code_of(&e), "08006", "{e:?}");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    }
}

/// Six clients each check ten computed results through a proxy started with `flags`.
async fn all_correct(pg: &TempPostgres, flags: &[&str]) {
    let proxy = TestProxy::start(pg, flags).await;
    let mut tasks = Vec::new();
    for w in 0..6i32 {
        let c = proxy.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..10i32 {
                // Simple protocol: named prepared statements do not survive transaction
                // pooling (each transaction may run on another server connection).
                let sql = format!("SELECT {w} * 1000 + {i}, pg_sleep(0.01)::text");
                let mut rows = Vec::new();
                // A shed query never ran: retry it (bounded).
                for attempt in 0..50 {
                    match c.simple_query(&sql).await {
                        Ok(r) => {
                            rows = r;
                            break;
                        }
                        Err(e)
                            if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED)
                                && attempt < 49 =>
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                let got = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                assert_eq!(got, Some((w * 1000 + i).to_string()));
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("hung")
            .unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_below_and_above_pool_size() {
    let pg = cluster().await;
    all_correct(
        &pg,
        &[
            "--pool-size",
            "4",
            "--max-active",
            "2",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    all_correct(
        &pg,
        &[
            "--pool-size",
            "2",
            "--max-active",
            "8",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_holds_no_slot() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--max-active", "1"]).await;
    let x = proxy.client().await;
    // Inside a transaction the server stays pinned, so the extended protocol is safe here.
    x.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let y = proxy.client().await;
    for _ in 0..5 {
        let t = Instant::now();
        let rows = tokio::time::timeout(Duration::from_secs(3), y.simple_query("SELECT 1"))
            .await
            .expect("Y blocked behind an idle transaction")
            .unwrap();
        assert!(rows.len() >= 2, "{rows:?}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "Y waited {:?}",
            t.elapsed()
        );
    }
    // X's transaction is still its own.
    let v: i32 = x.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 2);
    x.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_connections_is_served_or_shed() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--max-active", "4", "--pool-size", "8"]).await;
    // The first connection logs in upstream; the burst then only talks to the proxy.
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let url = proxy.url();
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, barrier, tally) = (url.clone(), barrier.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let c = try_connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connect: {e:?}"));
            let res = c.simple_query("SELECT pg_sleep(0.01)").await;
            tally.record(&res);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("a client hung")
            .unwrap();
    }
    let (ok, shed, unavailable, other) = tally.get();
    println!("burst: ok={ok} shed={shed} unavailable={unavailable} other={other}");
    assert_eq!(ok + shed, 200);
    assert!(ok >= 4, "only {ok} served");
}

/// With standing-queue shedding off (`--codel-interval 0`), a waiter behind a long query
/// waits up to --queue-timeout and then runs. (With the default 100 ms interval it is shed
/// after about 100 ms: a queue that cannot drain for an interval is standing by definition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_waiter_waits_up_to_queue_timeout() {
    let pg = cluster().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "1",
            "--pool-size",
            "4",
            "--queue-timeout",
            "3s",
            "--codel-interval",
            "0",
        ],
    )
    .await;
    let x = Arc::new(proxy.client().await);
    let y = proxy.client().await;
    let x_run = {
        let x = x.clone();
        tokio::spawn(async move { x.simple_query("SELECT pg_sleep(1)").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), y.simple_query("SELECT 1"))
        .await
        .expect("Y hung");
    println!(
        "lone waiter: {:?} after {:?}",
        res.as_ref().err(),
        t.elapsed()
    );
    res.expect("a lone waiter within --queue-timeout must be served");
    x_run.await.unwrap().unwrap();
}
