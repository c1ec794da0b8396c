//! The PgBouncer-style admin console (database `pgsluice` or `pgbouncer`): every SHOW
//! command through psql with PgBouncer's column names, figures that match the load that ran,
//! the admin commands, who may use it, and the binary's SHUTDOWN.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::client_program;
use common::{cluster, connect, TestProxy};
use tokio_postgres::SimpleQueryMessage;

/// `psql -A` output of one console command: the header's column names and the rows.
#[derive(Debug)]
struct Table {
    cols: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
}

fn psql(port: u16, db: &str, user: &str, sql: &str) -> Result<Table, String> {
    let out = Command::new(client_program("psql"))
        .args([
            "-X",
            "-A",
            "-F",
            "|",
            "-P",
            "footer=off",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-h", "127.0.0.1", "-U", user, "-d", db, "-c", sql])
        .arg("-p")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let cols: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|l| {
            cols.iter()
                .cloned()
                .zip(l.split('|').map(str::to_string))
                .collect()
        })
        .collect();
    Ok(Table { cols, rows })
}

fn show(port: u16, what: &str) -> Table {
    psql(port, "pgbouncer", "postgres", &format!("SHOW {what}"))
        .unwrap_or_else(|e| panic!("SHOW {what}: {e}"))
}

fn num(row: &BTreeMap<String, String>, col: &str) -> u64 {
    let v = row
        .get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{col} = {v:?} is not a number"))
}

/// PgBouncer 1.25's columns, in order, then pgsluice's own (if any).
fn assert_columns(t: &Table, what: &str, pgbouncer: &[&str]) {
    assert!(t.cols.len() >= pgbouncer.len(), "SHOW {what}: {:?}", t.cols);
    assert_eq!(&t.cols[..pgbouncer.len()], pgbouncer, "SHOW {what}");
}

const SOCKET_COLS: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_report_the_load_that_ran() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--health-interval", "60s"]).await;
    let port = proxy.port();
    let app = |name: &str| proxy.url_with_app(name);

    // A known load: 10 explicit transactions of 3 batches, 5 autocommit queries, a prepared
    // statement (1 Parse batch) run 3 times, and a transaction left open.
    let a = connect(&app("console-a")).await;
    for _ in 0..10 {
        for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
            a.batch_execute(sql).await.unwrap();
        }
    }
    let b = connect(&app("console-b")).await;
    for _ in 0..5 {
        b.batch_execute("SELECT 2").await.unwrap();
    }
    let c = connect(&app("console-c")).await;
    let st = c.prepare("SELECT $1::int8 + 1").await.unwrap();
    for i in 0..3i64 {
        let row = c.query_one(&st, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i + 1);
    }
    let d = connect(&app("console-d")).await;
    d.batch_execute("BEGIN").await.unwrap();

    let pools = show(port, "POOLS");
    assert_columns(
        &pools,
        "POOLS",
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ],
    );
    assert_eq!(pools.rows.len(), 1, "one pool: {:?}", pools.rows);
    let p = &pools.rows[0];
    assert_eq!(
        (p["database"].as_str(), p["user"].as_str()),
        ("postgres", "postgres")
    );
    assert_eq!(num(p, "cl_active"), 4);
    assert_eq!(num(p, "cl_waiting"), 0);
    assert_eq!(
        num(p, "sv_active"),
        1,
        "d holds its connection inside BEGIN"
    );
    let pool_servers = num(p, "sv_active") + num(p, "sv_idle");
    assert!((1..=4).contains(&pool_servers), "{p:?}");
    assert_eq!(p["pool_mode"], "transaction");
    assert_eq!(num(p, "pool_size"), 4);

    let stats = show(port, "STATS");
    let mut want = vec!["database".to_string()];
    for prefix in ["total_", "avg_"] {
        for n in [
            "server_assignment_count",
            "xact_count",
            "query_count",
            if prefix == "avg_" { "recv" } else { "received" },
            "sent",
            "xact_time",
            "query_time",
            "wait_time",
            "client_parse_count",
            "server_parse_count",
            "bind_count",
            "client_login_count",
        ] {
            want.push(format!("{prefix}{n}"));
        }
    }
    assert_eq!(stats.cols, want, "SHOW STATS");
    let s = &stats.rows[0];
    assert_eq!(s["database"], "postgres");
    // 30 + 5 + 1 + 3 + 1 batches; transactions: 10 + 5 + 4 (a batch outside a transaction
    // is one), d's is still open.
    assert_eq!(num(s, "total_query_count"), 40, "{s:?}");
    assert_eq!(num(s, "total_xact_count"), 19, "{s:?}");
    assert_eq!(num(s, "total_client_login_count"), 4);
    assert_eq!(num(s, "total_client_parse_count"), 1);
    assert_eq!(num(s, "total_bind_count"), 3);
    assert!(num(s, "total_server_parse_count") >= 1);
    assert!(num(s, "total_received") > 0 && num(s, "total_sent") > 0);
    assert!(num(s, "total_query_time") > 0 && num(s, "total_xact_time") > 0);
    // Transaction mode: a connection per transaction, so at least one assignment per one.
    assert!(num(s, "total_server_assignment_count") >= 20, "{s:?}");
    assert!(
        num(s, "avg_query_count") > 0,
        "queries ran within the first period"
    );

    let totals = show(port, "STATS_TOTALS");
    assert_columns(
        &totals,
        "STATS_TOTALS",
        &[
            "database",
            "server_assignment_count",
            "xact_count",
            "query_count",
            "bytes_received",
            "bytes_sent",
            "xact_time",
            "query_time",
            "wait_time",
            "client_parse_count",
            "server_parse_count",
            "bind_count",
            "client_login_count",
        ],
    );
    assert_eq!(num(&totals.rows[0], "query_count"), 40);
    let avgs = show(port, "STATS_AVERAGES");
    assert_eq!(avgs.cols[12], "avg_client_login_count");
    let t = show(port, "TOTALS");
    assert_eq!(t.cols, ["name", "value"]);
    let by_name: BTreeMap<_, _> = t
        .rows
        .iter()
        .map(|r| (r["name"].clone(), r["value"].clone()))
        .collect();
    assert_eq!(by_name["total_query_count"], "40");

    let clients = show(port, "CLIENTS");
    assert_columns(&clients, "CLIENTS", SOCKET_COLS);
    let mut apps: Vec<_> = clients
        .rows
        .iter()
        .map(|r| r["application_name"].clone())
        .collect();
    apps.sort();
    assert_eq!(apps, ["console-a", "console-b", "console-c", "console-d"]);
    for r in &clients.rows {
        assert_eq!((r["type"].as_str(), r["state"].as_str()), ("C", "active"));
        assert_eq!(r["addr"], "127.0.0.1");
        assert!(num(r, "port") > 0 && num(r, "local_port") == port as u64);
        assert!(r["connect_time"].ends_with(" UTC"), "{r:?}");
    }

    let servers = show(port, "SERVERS");
    assert_columns(&servers, "SERVERS", SOCKET_COLS);
    assert_eq!(
        servers.rows.len() as u64,
        pool_servers,
        "{:?}",
        servers.rows
    );
    let active: Vec<_> = servers
        .rows
        .iter()
        .filter(|r| r["state"] == "active")
        .collect();
    assert_eq!(active.len(), 1, "{:?}", servers.rows);
    // The active server is linked to d, whose ptr is its id in hex.
    let d_row = clients
        .rows
        .iter()
        .find(|r| r["application_name"] == "console-d")
        .unwrap();
    assert_eq!(active[0]["link"], d_row["ptr"]);
    assert_eq!(num(active[0], "port"), pg.port() as u64);
    let backend: i32 = d
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(num(active[0], "remote_pid"), backend as u64);

    let dbs = show(port, "DATABASES");
    assert_columns(
        &dbs,
        "DATABASES",
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
        ],
    );
    assert_eq!(num(&dbs.rows[0], "current_client_connections"), 4);
    assert_eq!(num(&dbs.rows[0], "port"), pg.port() as u64);
    let users = show(port, "USERS");
    assert_columns(
        &users,
        "USERS",
        &[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ],
    );
    assert_eq!(users.rows[0]["name"], "postgres");
    let lists = show(port, "LISTS");
    assert_eq!(lists.cols, ["list", "items"]);
    let items: BTreeMap<_, _> = lists
        .rows
        .iter()
        .map(|r| (r["list"].clone(), num(r, "items")))
        .collect();
    assert_eq!((items["pools"], items["used_clients"]), (1, 4));
    assert_eq!(items["used_servers"], servers.rows.len() as u64);
    assert!(show(port, "VERSION").rows[0]["version"].starts_with("pgsluice "));
    let state = show(port, "STATE");
    assert_eq!(state.rows[1]["key"], "paused");
    assert_eq!(state.rows[1]["value"], "no");
    let config = show(port, "CONFIG");
    assert_eq!(config.cols, ["key", "value", "default", "changeable"]);
    assert!(config
        .rows
        .iter()
        .any(|r| r["key"] == "pool_size" && r["value"] == "4"));
    let guard = show(port, "GUARD");
    assert!(
        guard.rows[0]["pool"].starts_with("upstream "),
        "{:?}",
        guard.rows
    );
    assert_eq!(num(&guard.rows[1], "leased"), 1);

    // The `pgsluice` name works too; extended protocol gets a clear error, simple works.
    let console = connect(&proxy.url_for("postgres", "pgsluice")).await;
    let e = console.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("0A000"),
        "{e:?}"
    );
    let rows = console
        .simple_query("SHOW VERSION; SHOW STATE")
        .await
        .unwrap();
    let n = rows
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 4, "1 version row + 3 state rows");
    let e = console.simple_query("SHOW NOTHING").await.unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("42601"));
    let e = console.simple_query("SUSPEND").await.unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("0A000"));

    // PAUSE holds new queries (they get 57P03 after the queue timeout), RESUME lets them in.
    d.batch_execute("COMMIT").await.unwrap();
    console.simple_query("PAUSE").await.unwrap();
    assert_eq!(show(port, "STATE").rows[1]["value"], "yes");
    let paused = tokio::time::timeout(Duration::from_secs(20), b.batch_execute("SELECT 3"))
        .await
        .expect("a paused query is answered within the queue timeout");
    let e = paused.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("57P03"),
        "{e:?}"
    );
    console.simple_query("RESUME").await.unwrap();
    b.batch_execute("SELECT 4").await.unwrap();
    // RELOAD as an operator types it (psql prints the command's tag).
    psql(port, "pgbouncer", "postgres", "RELOAD").unwrap();

    drop((a, b, c, d, console));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_access_follows_admin_and_stats_users() {
    let pg = cluster().await;
    // Only `stats` may look, only `boss` may act; postgres (a loopback client) is refused.
    let proxy = TestProxy::start(&pg, &["--admin-users", "boss", "--stats-users", "stats"]).await;
    let port = proxy.port();
    let e = psql(port, "pgbouncer", "postgres", "SHOW POOLS").unwrap_err();
    assert!(e.contains("may not use the admin console"), "{e}");
    assert_eq!(
        psql(port, "pgbouncer", "stats", "SHOW STATE")
            .unwrap()
            .rows
            .len(),
        3
    );
    let e = psql(port, "pgbouncer", "stats", "PAUSE").unwrap_err();
    assert!(e.contains("SHOW commands only"), "{e}");
    psql(port, "pgbouncer", "boss", "PAUSE").unwrap();
    assert_eq!(show_as(port, "boss", "STATE").rows[1]["value"], "yes");
    psql(port, "pgbouncer", "boss", "RESUME").unwrap();
    proxy.shutdown().await;

    // Neither list, but an admin token: loopback may look, not act.
    let proxy = TestProxy::start(&pg, &["--admin-token", "s3cret"]).await;
    let port = proxy.port();
    assert_eq!(show(port, "STATE").rows[0]["value"], "yes");
    let e = psql(port, "pgbouncer", "postgres", "PAUSE").unwrap_err();
    assert!(e.contains("SHOW commands only"), "{e}");
    proxy.shutdown().await;
}

fn show_as(port: u16, user: &str, what: &str) -> Table {
    psql(port, "pgbouncer", user, &format!("SHOW {what}")).unwrap()
}

/// SHUTDOWN stops the process as SIGTERM does (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_stops_the_process() {
    let pg = cluster().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "off",
        ])
        .args(["--upstream", &pg.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgsluice");
    let mut up = false;
    for _ in 0..100 {
        if psql(port, "pgsluice", "postgres", "SHOW VERSION").is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "console did not answer in 10 s");
    psql(port, "pgsluice", "postgres", "SHUTDOWN").unwrap();
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

fn config_value(port: u16, key: &str) -> String {
    let t = show(port, "CONFIG");
    let row = t.rows.iter().find(|r| r["key"] == key);
    row.unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))["value"].clone()
}

/// SET changes a reloadable setting at once, outranks the file on RELOAD, and refuses
/// restart-only, unknown and invalid settings without changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_changes_settings_until_restart() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--max-active", "4"]).await;
    let port = proxy.port();
    let console = connect(&proxy.url_for("postgres", "pgbouncer")).await;
    let code = |e: tokio_postgres::Error| e.as_db_error().map(|d| d.code().code().to_string());

    psql(port, "pgbouncer", "postgres", "SET max_active = 2").unwrap();
    assert_eq!(config_value(port, "max_active"), "2");
    assert_eq!(num(&show(port, "GUARD").rows[0], "limit"), 2);
    // PgBouncer's name and a quoted value.
    console
        .simple_query("SET query_wait_timeout = '3s'")
        .await
        .unwrap();
    assert_eq!(config_value(port, "queue_timeout"), "3s");
    // The cancel, health-check and breaker settings are reloadable too.
    for (sql, key, want) in [
        ("SET cancel_grace = '2s'", "cancel_grace", "2s"),
        ("SET health_interval = '500ms'", "health_interval", "500ms"),
        ("SET breaker_threshold = 7", "breaker_threshold", "7"),
        ("SET breaker_cooldown = '1s'", "breaker_cooldown", "1s"),
        (
            "SET breaker_max_cooldown = '10s'",
            "breaker_max_cooldown",
            "10s",
        ),
    ] {
        console.simple_query(sql).await.unwrap();
        assert_eq!(config_value(port, key), want, "{sql}");
    }

    for (sql, want) in [
        ("SET threads = 2", "55000"),
        ("SET listen = '127.0.0.1:1'", "55000"),
        ("SET no_such_thing = 1", "42704"),
        ("SET max_active = 0", "22023"),
        ("SET queue_timeout = 'soon'", "22023"),
        ("SET max_active", "42601"),
        ("SET pool_mode = session", "55000"),
        ("SET max_queue = 'many'", "22023"),
    ] {
        let e = console.simple_query(sql).await.unwrap_err();
        let msg = e.as_db_error().map(|d| d.message().to_string());
        assert!(!msg.unwrap_or_default().contains("Usage"), "{sql}: {e:?}");
        assert_eq!(code(e).as_deref(), Some(want), "{sql}");
    }
    assert_eq!(config_value(port, "max_active"), "2");
    assert_eq!(config_value(port, "queue_timeout"), "3s");

    // RELOAD as an operator types it (psql prints the command's tag).
    psql(port, "pgbouncer", "postgres", "RELOAD").unwrap();
    assert_eq!(config_value(port, "max_active"), "2", "SET survives RELOAD");
    assert_eq!(num(&show(port, "GUARD").rows[0], "limit"), 2);

    // Queries still run under the new limit.
    let client = connect(&proxy.url()).await;
    let rows = client.query("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    drop((client, console));
    proxy.shutdown().await;
}
