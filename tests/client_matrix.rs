//! Client compatibility matrix: real drivers, each with its default prepared-statement
//! settings, run a workload through pgsluice against a throwaway PostgreSQL in transaction
//! and in session mode. Every workload runs several connections at once (more than the
//! transaction-mode pool has servers, so statements land on different server connections),
//! repeats prepared statements with new parameters, rolls back, recovers from an error
//! inside a transaction, copies in and out and cancels a running statement.
//!
//! External drivers are installed by `tests/clients/setup.sh`; one that is missing is
//! skipped with its reason, and with `PGSLUICE_REQUIRE_CLIENTS=1` a skip fails the test.
//! The table is printed and written to `target/client-matrix.md`
//! (`tests/clients/update_readme.sh` copies it into README).

mod common;
#[path = "client_matrix/external.rs"]
mod external;
#[path = "client_matrix/report.rs"]
mod report;
#[path = "client_matrix/rust_sqlx.rs"]
mod rust_sqlx;
#[path = "client_matrix/rust_tokio.rs"]
mod rust_tokio;

use std::path::Path;
use std::time::Duration;

use common::{cluster, TestProxy};
use report::{Cell, Check, Outcome, Row};

/// Executions of each prepared statement per connection (pgjdbc names its statements
/// from the fifth, psycopg prepares from the sixth).
const REPEAT: usize = 12;
/// Concurrent connections per driver.
const CONNS: usize = 4;
/// Bound on each step of the in-process workloads.
const WORKLOAD_LIMIT: Duration = Duration::from_secs(60);

struct Mode {
    name: &'static str,
    flags: &'static [&'static str],
}

/// Shedding is off (`--codel-interval 0`, long queue timeout): the matrix tests protocol
/// compatibility, and a loaded machine must not turn a 2-server pool into refusals.
/// Transaction mode gets 2 servers for 4+ client connections; session mode needs one per
/// client connection (pgbench opens 32).
const MODES: [Mode; 2] = [
    Mode {
        name: "transaction",
        flags: &[
            "--pool-mode",
            "transaction",
            "--pool-size",
            "2",
            "--codel-interval",
            "0",
            "--queue-timeout",
            "30s",
        ],
    },
    Mode {
        name: "session",
        flags: &[
            "--pool-mode",
            "session",
            "--pool-size",
            "40",
            "--codel-interval",
            "0",
            "--queue-timeout",
            "30s",
        ],
    },
];

/// Transaction mode must move a client's statements between server connections; session
/// mode must keep each client connection on one server of its own.
fn placement(mode: &str, counts: &[usize], distinct: usize) -> Check {
    if mode == "transaction" {
        let moved = counts.iter().any(|&c| c >= 2);
        Check::new(
            "placement",
            moved,
            format!("server backends seen per client connection: {counts:?}"),
        )
    } else {
        let pinned = counts.iter().all(|&c| c == 1) && distinct == counts.len();
        Check::new(
            "placement",
            pinned,
            format!("backends per connection {counts:?}, {distinct} distinct"),
        )
    }
}

/// A crate's version as locked in Cargo.lock.
fn locked_version(krate: &str) -> String {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))
        .unwrap_or_default();
    let needle = format!("name = \"{krate}\"\nversion = \"");
    lock.find(&needle)
        .and_then(|at| {
            let rest = &lock[at + needle.len()..];
            rest.split('"').next().map(|v| format!("{krate} {v}"))
        })
        .unwrap_or_else(|| krate.to_string())
}

/// What a workload said about its own version (its first check's detail).
fn reported_version(cells: &[&Cell]) -> String {
    cells
        .iter()
        .flat_map(|c| c.checks.first())
        .map(|c| match c.detail.split_once("connections, ") {
            Some((_, v)) => v.to_string(),
            None => c.detail.clone(),
        })
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| "-".into())
}

const NOT_SELECTED: &str = "not selected by PGSLUICE_MATRIX_ONLY";

/// `PGSLUICE_MATRIX_ONLY=psycopg,pgjdbc` runs only the drivers whose names contain one of
/// the words (to iterate on one driver).
fn selected(name: &str) -> bool {
    match std::env::var("PGSLUICE_MATRIX_ONLY") {
        Ok(only) if !only.trim().is_empty() => only
            .split(',')
            .map(str::trim)
            .any(|w| !w.is_empty() && name.contains(w)),
        _ => true,
    }
}

fn slug(name: &str) -> String {
    name.chars()
        .take_while(|c| *c != ' ' && *c != '(')
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_matrix() {
    common::raise_fd_limit();
    let layout = external::Layout::new();
    let externals = external::all();
    let mut names: Vec<String> = vec!["tokio-postgres".into(), "sqlx".into()];
    names.extend(externals.iter().map(|e| e.name.to_string()));
    let mut cells: Vec<Vec<Cell>> = vec![Vec::new(); names.len()];
    let mut server_version = String::new();

    for mode in &MODES {
        let pg = cluster().await;
        let proxy = TestProxy::start(&pg, mode.flags).await;
        if server_version.is_empty() {
            let c = proxy.client().await;
            if let Ok(r) = c.query_one("SHOW server_version", &[]).await {
                server_version = r.get(0);
            }
        }
        let url = proxy.url();
        cells[0].push(if selected(&names[0]) {
            let t = rust_tokio::run(&url, mode.name, "matrix_tokio", CONNS).await;
            Cell::judge(t, Ok(()))
        } else {
            Cell::skip(NOT_SELECTED)
        });
        cells[1].push(if selected(&names[1]) {
            let s = rust_sqlx::run(&url, mode.name, "matrix_sqlx", CONNS).await;
            Cell::judge(s, Ok(()))
        } else {
            Cell::skip(NOT_SELECTED)
        });
        for (i, ext) in externals.iter().enumerate() {
            if !selected(ext.name) {
                cells[i + 2].push(Cell::skip(NOT_SELECTED));
                continue;
            }
            let table = format!("matrix_{}", slug(ext.name));
            let cell = ext.run(&layout, proxy.port(), mode.name, &table).await;
            cells[i + 2].push(cell);
        }
        proxy.shutdown().await;
    }

    let rows: Vec<Row> = names
        .iter()
        .zip(cells)
        .enumerate()
        .map(|(i, (name, mut pair))| {
            let session = pair.pop().expect("session cell");
            let transaction = pair.pop().expect("transaction cell");
            let version = match i {
                0 => locked_version("tokio-postgres"),
                1 => locked_version("sqlx"),
                _ => reported_version(&[&transaction, &session]),
            };
            Row {
                client: name.clone(),
                version,
                transaction,
                session,
            }
        })
        .collect();

    let context = format!(
        "PostgreSQL {server_version}. Transaction mode: `--pool-size 2`, session mode: \
         `--pool-size 40`, both with `--codel-interval 0 --queue-timeout 30s`; {CONNS} \
         concurrent connections per driver (pgbench: 32), each prepared statement run \
         {REPEAT} times per connection. Checks: `prepared` (server-side prepared \
         statements, repeated with new parameters; psql: SQL PREPARE/EXECUTE in session \
         mode, `repeated` simple queries in transaction mode), `placement` (transaction \
         mode: a client connection's statements ran on more than one server connection; \
         session mode: one server each), `rollback`, `error_in_tx` (22012, then 25P02, \
         ROLLBACK, connection usable), `copy` (COPY FROM STDIN and TO STDOUT), `cancel` \
         (the driver's cancel of a running `pg_sleep`: 57014, connection usable)."
    );
    let md = report::markdown(&rows, &context);
    let table = report::text_table(&rows);
    println!("\n{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-matrix.md");
    if let Err(e) = std::fs::write(&out, &md) {
        eprintln!("could not write {}: {e}", out.display());
    } else {
        println!("written to {}", out.display());
    }

    let require = std::env::var("PGSLUICE_REQUIRE_CLIENTS").is_ok_and(|v| v == "1");
    let mut problems = Vec::new();
    for r in &rows {
        for (mode, cell) in [("transaction", &r.transaction), ("session", &r.session)] {
            match &cell.outcome {
                Outcome::Pass => {}
                Outcome::Fail(why) => problems.push(format!("{} ({mode}): {why}", r.client)),
                Outcome::Skip(why) if require => problems.push(format!(
                    "{} ({mode}) skipped but PGSLUICE_REQUIRE_CLIENTS=1: {why}",
                    r.client
                )),
                Outcome::Skip(why) => println!("SKIP {} ({mode}): {why}", r.client),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "client matrix:\n{}\n\n{md}",
        problems.join("\n")
    );
}
