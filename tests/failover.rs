//! Several upstream hosts: a primary and a streaming standby (pg_basebackup -R) on loopback.
//! Roles are detected, reads asked for with `NAME@ro` land on the standby, writes on the
//! primary; when the primary dies and the standby is promoted, writes through the same
//! pgsluice address succeed again without a restart or a reload, and no write ever reaches
//! the standby.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cluster, connect, try_connect, TempPostgres, TestProxy};

struct Pair {
    primary: TempPostgres,
    standby: TempPostgres,
}

async fn pair() -> Pair {
    let primary = cluster().await;
    primary.psql(&[
        "-c",
        "CREATE TABLE w (writer int, n int, PRIMARY KEY (writer, n))",
    ]);
    // pg_basebackup and pg_ctl block.
    let standby = tokio::task::block_in_place(|| TempPostgres::standby_of(&primary));
    Pair { primary, standby }
}

fn upstream(p: &Pair) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        p.primary.port(),
        p.standby.port()
    )
}

/// Roles as the admin API reports them, in the listed order.
async fn roles(proxy: &TestProxy) -> Vec<String> {
    let (code, body) = proxy.http_get("/pools").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("status json");
    v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["role"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn wait_roles(proxy: &TestProxy, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = roles(proxy).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "roles never became {want:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn in_recovery(c: &tokio_postgres::Client) -> bool {
    let row = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_detected_and_reads_asked_for_go_to_the_standby() {
    let p = pair().await;
    let proxy = TestProxy::start_upstream(
        &upstream(&p),
        &["--pool-size", "2", "--host-check-interval", "100ms"],
    )
    .await;
    wait_roles(&proxy, &["primary", "standby"]).await;

    // More clients than connections on both routes; every answer is checked.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = proxy.url();
        let ro = proxy.url_for("postgres", "postgres@ro");
        tasks.push(tokio::spawn(async move {
            let w = connect(&url).await;
            let r = connect(&ro).await;
            for n in 0..20 {
                assert!(
                    !in_recovery(&w).await,
                    "a write-route query ran on the standby"
                );
                w.execute("INSERT INTO w VALUES ($1, $2)", &[&i, &n])
                    .await
                    .unwrap();
                assert!(
                    in_recovery(&r).await,
                    "a read-route query ran on the primary"
                );
                let row = r.query_one("SELECT 40 + $1::int", &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), 40 + n);
            }
            // The read route cannot write: the standby refuses, nothing is executed.
            let e = r
                .execute("INSERT INTO w VALUES ($1, 1000)", &[&i])
                .await
                .unwrap_err();
            assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("25006"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let direct = p.primary.client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6 * 20);

    // The console shows the same picture.
    let out = proxy.psql(&["-d", "pgsluice", "-At", "-F", "|", "-c", "SHOW HOSTS"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].contains("|primary|") && rows[0].ends_with("|1"),
        "{text}"
    );
    assert!(
        rows[1].contains("|standby|") && rows[1].ends_with("|0"),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_standby_without_a_restart() {
    failover_under_writes("transaction", "3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_writes_follow_a_promoted_standby() {
    // A connection per client in session mode: room for every writer.
    failover_under_writes("session", "8").await;
}

/// Eight writers commit small transactions through pgsluice while the primary is killed and
/// the standby promoted.
async fn failover_under_writes(mode: &str, pool_size: &str) {
    let p = pair().await;
    let proxy = TestProxy::start_upstream(
        &upstream(&p),
        &[
            "--pool-mode",
            mode,
            "--pool-size",
            pool_size,
            "--host-check-interval",
            "100ms",
            "--queue-timeout",
            "5s",
        ],
    )
    .await;
    wait_roles(&proxy, &["primary", "standby"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let promoted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    // Per writer: rows it saw committed after the promotion, and errors by SQLSTATE.
    let committed_after: Arc<Mutex<Vec<(i32, i32)>>> = Arc::default();
    let errors: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let first_ok_after = Arc::new(AtomicU64::new(u64::MAX));
    // The latest of the writers' first commits after the promotion: all of them back.
    let all_back_after = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = proxy.url();
        let stop = stop.clone();
        let promoted_at = promoted_at.clone();
        let committed_after = committed_after.clone();
        let errors = errors.clone();
        let first_ok_after = first_ok_after.clone();
        let all_back_after = all_back_after.clone();
        tasks.push(tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut n = 0i32;
            let mut back = false;
            let deadline = Instant::now() + Duration::from_secs(40);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let c = match client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => match try_connect(&url).await {
                        Ok(c) => c,
                        Err(e) => {
                            let code = e
                                .as_db_error()
                                .map_or("connect".to_string(), |d| d.code().code().to_string());
                            *errors.lock().unwrap().entry(code).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                n += 1;
                let sent = Instant::now();
                let res = c
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO w VALUES ({i}, {n}); SELECT pg_sleep(0.005); COMMIT"
                    ))
                    .await;
                match res {
                    Ok(()) => {
                        let at = *promoted_at.lock().unwrap();
                        if let Some(at) = at {
                            if sent > at {
                                committed_after.lock().unwrap().push((i, n));
                                let ms = at.elapsed().as_millis() as u64;
                                first_ok_after.fetch_min(ms, Ordering::Relaxed);
                                if !back {
                                    back = true;
                                    all_back_after.fetch_max(ms, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let code = e
                            .as_db_error()
                            .map_or("closed".to_string(), |d| d.code().code().to_string());
                        *errors.lock().unwrap().entry(code).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                client = Some(c);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = errors.lock().unwrap().clone();
    assert!(before.is_empty(), "errors before the failover: {before:?}");

    // The primary dies hard; the standby is promoted by hand (as an operator or Patroni).
    let t_killed = Instant::now();
    tokio::task::block_in_place(|| {
        p.primary.kill_immediate();
        p.standby.promote();
    });
    let t_promoted = Instant::now();
    let kill_to_promoted = t_promoted.duration_since(t_killed).as_millis();
    *promoted_at.lock().unwrap() = Some(t_promoted);

    // Every writer commits again through the same address.
    let deadline = Instant::now() + Duration::from_secs(20);
    while committed_after.lock().unwrap().len() < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let window = first_ok_after.load(Ordering::Relaxed);
    let all_back = all_back_after.load(Ordering::Relaxed);
    let errors = errors.lock().unwrap().clone();
    let after = committed_after.lock().unwrap().clone();
    eprintln!(
        "failover ({mode} mode): kill + promote took {kill_to_promoted} ms; first commit {window} ms after the \
         promotion, every writer committing again after {all_back} ms; errors: {errors:?}; \
         {} commits after it",
        after.len()
    );
    assert!(after.len() >= 40, "writes did not come back: {errors:?}");
    assert!(
        window < 5_000,
        "writes came back {window} ms after the promotion"
    );
    assert_eq!(
        errors.get("25006"),
        None,
        "a write was sent to a standby: {errors:?}"
    );
    // What a client may see while its primary dies: its connection lost mid-query.
    for code in errors.keys() {
        assert!(
            ["closed", "08006", "57P01", "57P02", "57P03", "08000", "08001"]
                .contains(&code.as_str()),
            "unexpected error during the failover: {code} ({errors:?})"
        );
    }

    // Every commit acknowledged after the promotion is on the new primary.
    let direct = p.standby.client().await;
    for (i, n) in &after {
        let got: i64 = direct
            .query_one(
                "SELECT count(*) FROM w WHERE writer = $1 AND n = $2",
                &[i, n],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, 1, "commit ({i}, {n}) acknowledged but missing");
    }
    let roles_now = roles(&proxy).await;
    assert_eq!(roles_now, ["down", "primary"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_leave_a_lagging_standby_and_come_back_when_it_catches_up() {
    let p = pair().await;
    let proxy = TestProxy::start_upstream(
        &upstream(&p),
        &[
            "--pool-size",
            "2",
            "--host-check-interval",
            "100ms",
            "--max-replica-lag",
            "256kB",
        ],
    )
    .await;
    wait_roles(&proxy, &["primary", "standby"]).await;
    let r = connect(&proxy.url_for("postgres", "postgres@ro")).await;
    assert!(in_recovery(&r).await);

    let until = |want: bool| {
        let r = &r;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if in_recovery(r).await == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "reads never moved (want in_recovery = {want})"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::task::block_in_place(|| {
        p.standby.psql(&["-c", "SELECT pg_wal_replay_pause()"]);
        // About 3 MB of WAL the standby receives but does not replay.
        p.primary.psql(&[
            "-c",
            "CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g",
        ]);
    });
    until(false).await;
    let (_, body) = proxy.http_get("/pools").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lag = v["hosts"][1]["lag_bytes"].as_u64().unwrap_or(0);
    assert!(
        lag > 256 * 1024,
        "lag {lag} should be past the bound: {body}"
    );

    tokio::task::block_in_place(|| {
        p.standby.psql(&["-c", "SELECT pg_wal_replay_resume()"]);
    });
    until(true).await;
    // Within the bound, not necessarily caught up: the rows written while it lagged arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    let n = loop {
        // 42P01 while the table's creation is not replayed yet.
        let n = match r.query_one("SELECT count(*) FROM big", &[]).await {
            Ok(row) => row.get::<_, i64>(0),
            Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("42P01") => -1,
            Err(e) => panic!("{e}"),
        };
        if n == 20000 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(n, 20000);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_stop_writes_until_one_is_gone() {
    let a = cluster().await;
    let b = cluster().await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        a.port(),
        b.port()
    );
    let proxy = TestProxy::start_upstream(
        &url,
        &["--host-check-interval", "100ms", "--connect-timeout", "1s"],
    )
    .await;
    wait_roles(&proxy, &["primary", "primary"]).await;
    // The refusal comes at login (a transaction-mode login needs the server's parameters
    // from a first connection) or at the first query; either way, with the reason.
    let refusal = |e: tokio_postgres::Error| {
        let db = e.as_db_error().expect("an error from pgsluice").clone();
        assert_eq!(db.code().code(), "08006");
        assert!(
            db.message()
                .contains("more than one upstream host claims to be primary"),
            "{}",
            db.message()
        );
    };
    for db in ["postgres", "postgres@ro"] {
        let t0 = Instant::now();
        match try_connect(&proxy.url_for("postgres", db)).await {
            Err(e) => refusal(e),
            Ok(c) => refusal(c.simple_query("SELECT 1").await.unwrap_err()),
        }
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    tokio::task::block_in_place(|| a.kill_immediate());
    wait_roles(&proxy, &["down", "primary"]).await;
    // The refusals opened the circuit breaker: retries fail fast (57P03, "retrying is
    // safe") until its cool-down passes and a connect succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let res = match try_connect(&proxy.url()).await {
            Ok(c) => c.query_one("SELECT inet_server_port()", &[]).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(row) => break row,
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert!(matches!(code.as_deref(), Some("57P03" | "08006")), "{e:?}");
                assert!(Instant::now() < deadline, "writes never came back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(row.get::<_, i32>(0), b.port() as i32);
    proxy.shutdown().await;
}

/// Overload is not failure: a read route saturated to the point of shedding keeps its
/// standby (the role checks have their own connection), and reads stay there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_standby_sheds_but_is_never_ejected() {
    let p = pair().await;
    let proxy = TestProxy::start_upstream(
        &upstream(&p),
        &[
            "--pool-size",
            "2",
            "--max-active",
            "2",
            "--max-queue",
            "2",
            "--host-check-interval",
            "100ms",
        ],
    )
    .await;
    wait_roles(&proxy, &["primary", "standby"]).await;
    let ro = proxy.url_for("postgres", "postgres@ro");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let admin = proxy.admin_addr();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (_, body) = common::proxy::http_request(admin, "GET", "/pools").await;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let roles: Vec<String> = v["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["role"].as_str().unwrap_or("").to_string())
                    .collect();
                seen.push(roles);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let ro = ro.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&ro).await;
            let (mut ok, mut shed) = (0, 0);
            for _ in 0..6 {
                match c
                    .query_one("SELECT pg_is_in_recovery(), pg_sleep(0.15)::text", &[])
                    .await
                {
                    Ok(row) => {
                        assert!(row.get::<_, bool>(0), "a read left the standby");
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(
                            e.as_db_error().map(|d| d.code().code()),
                            Some("53400"),
                            "{e}"
                        );
                        shed += 1;
                    }
                }
            }
            (ok, shed)
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let (o, s) = t.await.unwrap();
        ok += o;
        shed += s;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    assert!(shed > 0, "the load never overloaded the route ({ok} ok)");
    assert!(ok > 0, "nothing ran");
    assert!(!seen.is_empty());
    for roles in &seen {
        assert_eq!(
            roles,
            &["primary", "standby"],
            "a role changed under overload"
        );
    }
    let r = connect(&ro).await;
    assert!(in_recovery(&r).await);
    proxy.shutdown().await;
}
