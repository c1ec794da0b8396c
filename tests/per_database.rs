//! Per-database operation: the console's `PAUSE db`, `RESUME db` and `KILL db`, and the
//! `[databases.NAME]` / `[users.NAME]` settings of the TOML file (pool mode, max-active,
//! queue bounds, pool size), each checked against what a client and the database see.

mod common;

use std::time::{Duration, Instant};

use common::{connect, TestProxy};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Rows of a console SHOW as column -> value maps.
async fn show(console: &Client, what: &str) -> Vec<std::collections::HashMap<String, String>> {
    let msgs = console.simple_query(&format!("SHOW {what}")).await.unwrap();
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The SHOW POOLS row of pool (database, user).
async fn pool_row(
    console: &Client,
    db: &str,
    user: &str,
) -> std::collections::HashMap<String, String> {
    show(console, "POOLS")
        .await
        .into_iter()
        .find(|r| r["database"] == db && r["user"] == user)
        .unwrap_or_else(|| panic!("no pool {db}/{user}"))
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Client backends of `db` as the database itself sees them.
async fn backends_of(direct: &Client, db: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `f` every 20 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until the database shows `SELECT pg_sleep(60)` running.
async fn assert_sleep_running(direct: &Client) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        })
        .await,
        "the long query is running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_databases_sessions_closes_its_servers_and_holds_it_until_resume() {
    let pg = common::cluster().await;
    let direct = pg.client().await;
    direct.batch_execute("CREATE DATABASE app").await.unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--queue-timeout", "20s"]).await;
    let console = connect(&proxy.url_for("postgres", "pgsluice")).await;

    // On `app`: one client inside a transaction, one running a long query, one idle with an
    // idle server connection left in the pool. On `postgres`: a bystander.
    let in_tx = connect(&proxy.url_for("postgres", "app")).await;
    in_tx
        .batch_execute("BEGIN; CREATE TABLE killed_t (x int)")
        .await
        .unwrap();
    let sleeper = connect(&proxy.url_for("postgres", "app")).await;
    let sleeping = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = sleeper.simple_query("SELECT pg_sleep(60)").await;
        (r.map(|_| ()), t0.elapsed())
    });
    let idle = connect(&proxy.url_for("postgres", "app")).await;
    idle.simple_query("SELECT 1").await.unwrap();
    let bystander = connect(&proxy.url()).await;
    bystander.simple_query("SELECT 1").await.unwrap();
    assert_sleep_running(&direct).await;
    assert!(backends_of(&direct, "app").await >= 2);

    // Refusals first: names the console does not know, or its own.
    for (cmd, want) in [
        ("KILL nosuch", "3D000"),
        ("KILL pgbouncer", "42601"),
        ("KILL", "42601"),
    ] {
        let e = console.simple_query(cmd).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some(want), "{cmd}: {e:?}");
    }

    console_psql(&proxy, "KILL app");

    // The running query ended at once with PostgreSQL's terminated-backend error.
    let (r, took) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the killed query returns")
        .unwrap();
    let e = r.expect_err("a killed query fails");
    assert_eq!(code(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // The others are ended too, the one inside a transaction included.
    for c in [&in_tx, &idle] {
        assert!(
            c.simple_query("SELECT 1").await.is_err(),
            "a killed session is gone"
        );
    }
    // The database sees none of `app`'s backends any more: KILL closed the idle server too.
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends_of(&direct, "app").await == 0
        })
        .await,
        "app still has {} backends",
        backends_of(&direct, "app").await
    );
    // The transaction was rolled back with its backend, not committed by a reuse.
    let app_direct = connect(&pg.url_for("postgres", None, "app")).await;
    let t: Option<String> = app_direct
        .query_one("SELECT to_regclass('killed_t')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, None);
    drop(app_direct);
    let row = pool_row(&console, "app", "postgres").await;
    assert_eq!(row["sv_active"], "0", "{row:?}");
    assert_eq!(row["sv_idle"], "0", "{row:?}");
    let dbs = show(&console, "DATABASES").await;
    let app = dbs.iter().find(|r| r["name"] == "app").unwrap();
    assert_eq!(app["paused"], "1");
    let other = dbs.iter().find(|r| r["name"] == "postgres").unwrap();
    assert_eq!(other["paused"], "0");

    // Other databases run on; the killed one holds new queries until RESUME.
    bystander.simple_query("SELECT 2").await.unwrap();
    let late = connect(&proxy.url_for("postgres", "app")).await;
    let waiting = tokio::spawn(async move {
        let r = late.query_one("SELECT 3::int", &[]).await;
        r.map(|row| row.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a query on a killed database waits");
    console.simple_query("RESUME app").await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("RESUME lets it in")
        .unwrap()
        .unwrap();
    assert_eq!(v, 3);
    let dbs = show(&console, "DATABASES").await;
    assert_eq!(
        dbs.iter().find(|r| r["name"] == "app").unwrap()["paused"],
        "0"
    );

    // PAUSE of one database: its open transactions finish, its new work waits, others run.
    let tx = connect(&proxy.url_for("postgres", "app")).await;
    tx.batch_execute("BEGIN; CREATE TABLE paused_t (x int)")
        .await
        .unwrap();
    console_psql(&proxy, "PAUSE app");
    tx.batch_execute("INSERT INTO paused_t VALUES (1); COMMIT")
        .await
        .expect("a transaction open at PAUSE finishes");
    let fresh = connect(&proxy.url_for("postgres", "app")).await;
    let held = tokio::spawn(async move {
        fresh
            .query_one("SELECT count(*) FROM paused_t", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    bystander.simple_query("SELECT 4").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "new work on a paused database waits");
    let e = console.simple_query("PAUSE nosuch").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("3D000"));
    // RESUME without a name ends every pause.
    console_psql(&proxy, "RESUME");
    let n = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("RESUME lets it in")
        .unwrap()
        .unwrap();
    assert_eq!(n, 1);
    drop((in_tx, idle, bystander, tx, console));
    proxy.shutdown().await;
}

/// One console command through psql, as an operator types it; its tag is the command's.
fn console_psql(proxy: &TestProxy, cmd: &str) {
    let out = proxy.psql(&["-d", "pgbouncer", "-c", cmd]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag = cmd.split_whitespace().next().unwrap_or_default();
    assert_eq!(text.trim(), tag, "{cmd}");
}

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let file = dir.join("pgsluice.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_user_entries_set_their_pools_mode_size_and_bounds() {
    let pg = common::cluster().await;
    let direct = pg.client().await;
    direct.batch_execute("CREATE DATABASE app").await.unwrap();
    direct
        .batch_execute("CREATE ROLE batch LOGIN")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = "pool-size = 4\nqueue-timeout = \"20s\"\n\
        [databases.app]\nmax-active = 1\nqueue_timeout = \"300ms\"\n\
        [databases.sess]\ndbname = \"postgres\"\npool-mode = \"session\"\n\
        [databases.spare]\ndbname = \"postgres\"\npool-size = 3\n\
        [users.batch]\npool-size = 1\nmax-active = \"auto\"\nmax-queue = 0\n";
    let file = write(dir.path(), text);
    let proxy = TestProxy::start(&pg, &["--config", file.to_str().unwrap()]).await;
    let console = connect(&proxy.url_for("postgres", "pgsluice")).await;

    // app: one query at a time; the second waits its database's 300 ms, not the global 20 s.
    let long = connect(&proxy.url_for("postgres", "app")).await;
    let running = tokio::spawn(async move { long.simple_query("SELECT pg_sleep(1.5)").await });
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_row(&console, "app", "postgres").await["active_queries"] == "1"
        })
        .await
    );
    let second = connect(&proxy.url_for("postgres", "app")).await;
    let t0 = Instant::now();
    let e = second.simple_query("SELECT 1").await.unwrap_err();
    let waited = t0.elapsed();
    assert_eq!(code(&e).as_deref(), Some("53400"), "{e:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1400),
        "waited {waited:?}"
    );
    running.await.unwrap().expect("the running query finishes");
    second
        .simple_query("SELECT 1")
        .await
        .expect("and then the next one runs");
    let row = pool_row(&console, "app", "postgres").await;
    assert_eq!(row["max_active"], "1", "{row:?}");
    assert_eq!(row["pool_mode"], "transaction");

    // batch (user entry): pool size 1 and no waiting allowed, its own database cap lifted.
    let b1 = connect(&proxy.url_for("batch", "app")).await;
    b1.batch_execute("BEGIN").await.unwrap();
    let b2 = connect(&proxy.url_for("batch", "app")).await;
    let e = b2.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        code(&e).as_deref(),
        Some("53400"),
        "max-queue 0 refuses at once: {e:?}"
    );
    let row = pool_row(&console, "app", "batch").await;
    assert_eq!(row["pool_size"], "1", "{row:?}");
    assert_eq!(row["max_active"], "4", "{row:?}");
    b1.batch_execute("COMMIT").await.unwrap();
    let users = show(&console, "USERS").await;
    let batch = users.iter().find(|r| r["name"] == "batch").unwrap();
    assert_eq!(batch["pool_size"], "1");

    // sess: session mode, so an idle client keeps its server connection (and its backend).
    let s = connect(&proxy.url_for("postgres", "sess")).await;
    let pid1: i32 = s
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let t = connect(&proxy.url()).await;
    t.simple_query("SELECT 1").await.unwrap();
    let sess = pool_row(&console, "sess", "postgres").await;
    assert_eq!(sess["pool_mode"], "session");
    assert_eq!(sess["sv_active"], "1", "{sess:?}");
    let plain = pool_row(&console, "postgres", "postgres").await;
    assert_eq!(plain["pool_mode"], "transaction");
    assert_eq!(plain["sv_active"], "0", "{plain:?}");
    let pid2: i32 = s
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2);
    let dbs = show(&console, "DATABASES").await;
    assert_eq!(
        dbs.iter().find(|r| r["name"] == "sess").unwrap()["pool_mode"],
        "session"
    );
    // A configured name nobody used yet is listed too, with its settings.
    let unused = dbs
        .iter()
        .find(|r| r["name"] == "spare")
        .expect("configured, unused");
    assert_eq!(unused["database"], "postgres");
    assert_eq!(unused["pool_size"], "3");
    assert_eq!(unused["current_connections"], "0");

    // Reload: bounds change at once; a pool mode needs a restart and stays.
    write(
        dir.path(),
        "pool-size = 4\n[databases.app]\nmax-active = 2\npool-mode = \"session\"\n\
         [databases.sess]\ndbname = \"postgres\"\npool-mode = \"session\"\n",
    );
    console.simple_query("RELOAD").await.unwrap();
    let row = pool_row(&console, "app", "postgres").await;
    assert_eq!(row["max_active"], "2", "{row:?}");
    assert_eq!(row["pool_mode"], "transaction", "{row:?}");
    let c = connect(&proxy.url_for("postgres", "app")).await;
    let p1: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(p1 > 0);
    drop((s, t, c, b1, b2, second, console));
    proxy.shutdown().await;
}

#[test]
fn bad_entries_stop_the_start_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        ("[users.u]\ndbname = \"x\"\n", "[users.u] dbname"),
        (
            "[databases.app]\npool-size = 0\n",
            "[databases.app] pool-size 0",
        ),
        (
            "[databases.a]\nmax-active = 0\n",
            "[databases.a] max-active 0",
        ),
        ("[databases.a]\nqueue-timeout = \"soon\"\n", "queue-timeout"),
        ("[databases.a]\npool-mode = \"statement\"\n", "statement"),
    ] {
        let file = write(dir.path(), text);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .args([
                "--config",
                file.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{text}: {err}");
    }
}

/// Session mode: each client holds its server for life, so KILL must close those servers
/// rather than hand them (with their session state) to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_in_session_mode_closes_the_servers_clients_held() {
    let pg = common::cluster().await;
    let direct = pg.client().await;
    let proxy = TestProxy::start(&pg, &["--pool-mode", "session", "--pool-size", "2"]).await;
    let console = connect(&proxy.url_for("postgres", "pgsluice")).await;
    let a = connect(&proxy.url()).await;
    a.batch_execute("SET application_name = 'held'; CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    console_psql(&proxy, "KILL postgres");
    let e = a.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        a.is_closed() || code(&e).as_deref() == Some("57P01"),
        "{e:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await,
        "the killed client's backend is gone"
    );
    console_psql(&proxy, "RESUME");
    let b = connect(&proxy.url()).await;
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name'), to_regclass('pg_temp.mine') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_ne!(row.get::<_, i32>(0), pid);
    assert_ne!(row.get::<_, String>(1), "held");
    assert!(row.get::<_, bool>(2), "no temp table of the killed session");
    drop((a, b, console));
    proxy.shutdown().await;
}

/// A client queued for a connection of a killed database is ended at once with 57P01 (not
/// after its queue timeout), and its query never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_queued_client_before_its_query_runs() {
    let pg = common::cluster().await;
    let direct = pg.client().await;
    direct.batch_execute("CREATE DATABASE app").await.unwrap();
    let app_direct = connect(&pg.url_for("postgres", None, "app")).await;
    app_direct
        .batch_execute("CREATE TABLE queued_t (x int)")
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "1", "--queue-timeout", "20s"]).await;
    let console = connect(&proxy.url_for("postgres", "pgsluice")).await;

    // The only connection runs a long query; a second client queues behind it.
    let sleeper = connect(&proxy.url_for("postgres", "app")).await;
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await });
    assert_sleep_running(&direct).await;
    let queued = connect(&proxy.url_for("postgres", "app")).await;
    let waiting = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = queued.simple_query("INSERT INTO queued_t VALUES (1)").await;
        (r.map(|_| ()), t0.elapsed())
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_row(&console, "app", "postgres").await["cl_waiting"] == "1"
        })
        .await,
        "the second client is queued"
    );

    console_psql(&proxy, "KILL app");
    let (r, took) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the queued client is answered")
        .unwrap();
    let e = r.expect_err("a killed queued query fails");
    assert_eq!(code(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(
        took < Duration::from_secs(15),
        "ended by KILL, not the queue timeout: {took:?}"
    );
    let e = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the running query is ended")
        .unwrap()
        .expect_err("a killed query fails");
    assert_eq!(code(&e).as_deref(), Some("57P01"), "{e:?}");

    // After RESUME the table is still empty: the queued INSERT never reached the database.
    console.simple_query("RESUME app").await.unwrap();
    let n: i64 = app_direct
        .query_one("SELECT count(*) FROM queued_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the queued query ran");
    let after = connect(&proxy.url_for("postgres", "app")).await;
    after
        .simple_query("SELECT 1")
        .await
        .expect("a new client after RESUME");
    drop((console, after, app_direct));
    proxy.shutdown().await;
}
