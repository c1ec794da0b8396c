//! Self-checks of the shared test harness: throwaway clusters and the fault shim.

mod common;

use std::time::{Duration, Instant};

use common::{connect, try_connect, FaultShim, HostAuth, Mode, TempPostgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_in_parallel() {
    let started = Instant::now();
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(TempPostgres::new),
        tokio::task::spawn_blocking(TempPostgres::new)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    eprintln!("two clusters up in {:?}", started.elapsed());
    assert_ne!(a.port(), b.port());

    let ca = a.client().await;
    let cb = b.client().await;
    ca.batch_execute("CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    let v: i32 = ca.query_one("SELECT 40 + 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
    // The clusters are independent.
    let err = cb
        .batch_execute("SELECT * FROM only_in_a")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );

    let max: String = ca
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "300");
    assert_eq!(TempPostgres::active_backends(&ca).await, 0);
    let sleeper = a.client().await;
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(0.5)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(TempPostgres::active_backends(&ca).await, 1);
    sleeping.await.unwrap().unwrap();
    assert_eq!(TempPostgres::active_backends(&ca).await, 0);
}

/// Clusters are copies of one initdb'd template, not an initdb each (which made test runs
/// slow under load): two clusters share the template's system identifier. (A structural
/// check: a time bound here failed on a loaded machine while proving nothing.)
#[test]
fn clusters_are_copies_of_one_template() {
    let started = Instant::now();
    let (a, b) = (TempPostgres::new(), TempPostgres::new());
    eprintln!("two clusters up in {:?}", started.elapsed());
    let id = |pg: &TempPostgres| {
        let out = pg.psql(&[
            "-tA",
            "-c",
            "SELECT system_identifier FROM pg_control_system()",
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (ia, ib) = (id(&a), id(&b));
    assert!(!ia.is_empty(), "no system identifier");
    assert_eq!(ia, ib, "each cluster ran its own initdb");
    assert_ne!(a.port(), b.port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_restart_kill() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let port = pg.port();
    let pm = pg.postmaster_pid().expect("postmaster pid");
    assert!(
        !pg.backend_pids().is_empty(),
        "auxiliary processes expected"
    );

    let c = pg.client().await;
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    pg.stop();
    assert!(pg.postmaster_pid().is_none());
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "old session must be gone"
    );
    assert!(try_connect(&pg.url()).await.is_err());

    pg.start();
    assert_eq!(pg.port(), port);
    let c = pg.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    pg.restart();
    assert_ne!(pg.postmaster_pid(), Some(pm));
    let c = pg.client().await;
    // The cluster runs with synchronous_commit=off; this commit must reach the WAL.
    c.batch_execute("SET synchronous_commit = on; INSERT INTO t VALUES (2)")
        .await
        .unwrap();

    pg.kill_immediate();
    assert!(c.simple_query("SELECT 1").await.is_err());
    pg.start();
    // Recovery replays the WAL: committed rows survive the crash.
    let c = pg.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "log:\n{}", pg.log_tail());
    assert!(pg.log_tail().contains("ready to accept connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_freezes_queries() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let c = pg.client().await;
    pg.sigstop_all();
    let res = tokio::time::timeout(Duration::from_millis(500), c.simple_query("SELECT 1")).await;
    assert!(res.is_err(), "query must hang while the server is stopped");
    pg.sigcont_all();
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_methods() {
    for auth in [HostAuth::Md5, HostAuth::ScramSha256] {
        let pg = tokio::task::spawn_blocking(move || {
            TempPostgres::builder()
                .host_auth(auth, "s3cret'pw")
                .setting("work_mem", "8MB")
                .spawn()
        })
        .await
        .unwrap();
        let c = pg.client().await;
        let wm: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(wm, "8MB");
        let wrong = pg.url_for("postgres", Some("nope"), "postgres");
        let err = try_connect(&wrong)
            .await
            .expect_err("wrong password accepted");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{auth:?}: {err}"
        );
        let no_pw = pg.url_for("postgres", None, "postgres");
        assert!(
            try_connect(&no_pw).await.is_err(),
            "{auth:?} without password"
        );
        let out = pg.psql(&["-tA", "-c", "SELECT 1"]);
        assert!(out.status.success(), "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_modes() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let shim = FaultShim::start(pg.addr()).await;
    let url = format!(
        "postgres://postgres@{}/postgres?connect_timeout=5",
        shim.addr()
    );

    // Pass forwards queries.
    let c = connect(&url).await;
    let v: i32 = c
        .query_one("SELECT $1::int * 2", &[&21])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    assert_eq!(shim.connections(), 1);

    // Delay slows each chunk down.
    shim.set_mode(Mode::Delay(Duration::from_millis(150)));
    let t = Instant::now();
    c.simple_query("SELECT 1").await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );

    // Stall makes a query hang; it completes once forwarding resumes.
    shim.set_mode(Mode::Stall);
    let res = tokio::time::timeout(Duration::from_millis(400), c.simple_query("SELECT 1")).await;
    assert!(res.is_err(), "query must hang while stalled");
    shim.set_mode(Mode::Pass);
    let v: i32 = c.query_one("SELECT 9", &[]).await.unwrap().get(0);
    assert_eq!(v, 9);

    // cut_all resets the live connection: the client sees a connection error.
    shim.cut_all();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || err.code().is_none(), "{err}");
    // New connections after the cut work.
    let c = connect(&url).await;
    c.simple_query("SELECT 1").await.unwrap();

    // Blackhole: TCP connect succeeds but startup never completes.
    shim.set_mode(Mode::Blackhole);
    let before = shim.accepted();
    let res = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await;
    assert!(res.is_err(), "startup must hang in blackhole mode");
    assert_eq!(
        shim.accepted(),
        before + 1,
        "the TCP connection was accepted"
    );
    shim.set_mode(Mode::Pass);
    drop(c);
    drop(shim);
}
