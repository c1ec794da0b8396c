//! tokio-postgres workload, in-process. Default settings: `prepare` creates a named
//! server-side statement (`s0`, `s1`, ...); a query given as text prepares a named
//! statement, runs it, and closes it when it is dropped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::report::Check;
use super::{REPEAT, WORKLOAD_LIMIT};

/// One step of the workload: its checks, or why it could not run.
type Step<'a> = futures::future::BoxFuture<'a, Result<Vec<Check>, String>>;

async fn connect(url: &str) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE ({e})"))
}

pub async fn run(url: &str, mode: &str, table: &str, conns: usize) -> Vec<Check> {
    let mut out = Vec::new();
    let clients = match futures::future::try_join_all((0..conns).map(|_| connect(url))).await {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::new("connect", false, e));
            return out;
        }
    };
    out.push(Check::new("connect", true, format!("{conns} connections")));
    let tx_client = match connect(url).await {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::new("connect", false, e));
            return out;
        }
    };
    let create = format!("CREATE TABLE {table} (id int PRIMARY KEY, note text)");
    if let Err(e) = clients[0].batch_execute(&create).await {
        out.push(Check::new("setup", false, e.to_string()));
        return out;
    }
    let steps: [(&str, Step<'_>); 5] = [
        ("prepared", Box::pin(prepared(&clients, mode))),
        (
            "rollback",
            Box::pin(rollback(&tx_client, &clients[1], table)),
        ),
        (
            "error_in_tx",
            Box::pin(error_in_tx(&tx_client, &clients[1], table)),
        ),
        ("copy", Box::pin(copy(&clients[2], table))),
        ("cancel", Box::pin(cancel(&clients[3], &clients[0], table))),
    ];
    for (name, step) in steps {
        match tokio::time::timeout(WORKLOAD_LIMIT, step).await {
            Ok(Ok(checks)) => out.extend(checks),
            Ok(Err(e)) => out.push(Check::new(name, false, e)),
            Err(_) => out.push(Check::new(name, false, "timed out")),
        }
    }
    let _ = clients[0]
        .batch_execute(&format!("DROP TABLE {table}"))
        .await;
    out
}

async fn prepared(clients: &[Client], mode: &str) -> Result<Vec<Check>, String> {
    let work = clients.iter().enumerate().map(|(k, c)| async move {
        let stmt = c
            .prepare("SELECT $1::int * 2, pg_backend_pid()")
            .await
            .map_err(|e| format!("prepare: {e}"))?;
        let mut pids = HashSet::new();
        for i in 0..REPEAT {
            let n = (k * 1000 + i) as i32;
            let row = c
                .query_one(&stmt, &[&n])
                .await
                .map_err(|e| format!("execute: {e}"))?;
            let got: i32 = row.get(0);
            if got != n * 2 {
                return Err(format!("connection {k} run {i}: got {got}, want {}", n * 2));
            }
            pids.insert(row.get::<_, i32>(1));
            // A statement prepared, run and closed by text, as `query` does with a &str.
            let text: String = c
                .query_one("SELECT upper($1::text)", &[&format!("c{k}x{i}")])
                .await
                .map_err(|e| format!("query by text: {e}"))?
                .get(0);
            if text != format!("C{k}X{i}") {
                return Err(format!("query by text returned {text}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, String>(pids)
    });
    let per_conn = futures::future::try_join_all(work).await?;
    let mut checks = vec![Check::new(
        "prepared",
        true,
        format!(
            "{} connections x {REPEAT} executions of a prepared statement and {REPEAT} \
             prepare-run-close by text, values checked",
            clients.len()
        ),
    )];
    checks.push(super::placement(
        mode,
        &per_conn.iter().map(|p| p.len()).collect::<Vec<_>>(),
        per_conn.iter().flatten().collect::<HashSet<_>>().len(),
    ));
    Ok(checks)
}

async fn count(c: &Client, table: &str, id: i32) -> Result<i64, String> {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE id = $1"),
        &[&id],
    )
    .await
    .map(|r| r.get(0))
    .map_err(|e| e.to_string())
}

async fn rollback(c: &Client, other: &Client, table: &str) -> Result<Vec<Check>, String> {
    c.batch_execute("BEGIN").await.map_err(|e| e.to_string())?;
    c.execute(
        &format!("INSERT INTO {table} (id, note) VALUES ($1, $2)"),
        &[&1i32, &"rolled back"],
    )
    .await
    .map_err(|e| e.to_string())?;
    c.batch_execute("ROLLBACK")
        .await
        .map_err(|e| e.to_string())?;
    let n = count(other, table, 1).await?;
    Ok(vec![Check::new(
        "rollback",
        n == 0,
        format!("rows after ROLLBACK: {n}"),
    )])
}

async fn error_in_tx(c: &Client, other: &Client, table: &str) -> Result<Vec<Check>, String> {
    c.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} (id, note) VALUES (2, 'doomed')"
    ))
    .await
    .map_err(|e| e.to_string())?;
    let first = match c.query_one("SELECT 1 / $1::int", &[&0i32]).await {
        Ok(_) => "none".to_string(),
        Err(e) => code(&e),
    };
    let second = match c.query_one("SELECT 1", &[]).await {
        Ok(_) => "none".to_string(),
        Err(e) => code(&e),
    };
    c.batch_execute("ROLLBACK")
        .await
        .map_err(|e| e.to_string())?;
    let usable = c
        .query_one("SELECT 41 + $1::int", &[&1i32])
        .await
        .map(|r| r.get::<_, i32>(0) == 42)
        .unwrap_or(false);
    let n = count(other, table, 2).await?;
    let ok = first == SqlState::DIVISION_BY_ZERO.code()
        && second == SqlState::IN_FAILED_SQL_TRANSACTION.code()
        && usable
        && n == 0;
    Ok(vec![Check::new(
        "error_in_tx",
        ok,
        format!("{first} then {second}, ROLLBACK, usable={usable}, rows={n}"),
    )])
}

async fn copy(c: &Client, table: &str) -> Result<Vec<Check>, String> {
    let rows: String = (0..200)
        .map(|i| format!("{}\tline {i}\n", 100 + i))
        .collect();
    let sink = c
        .copy_in(&format!("COPY {table} (id, note) FROM STDIN"))
        .await
        .map_err(|e| e.to_string())?;
    futures::pin_mut!(sink);
    sink.send(Bytes::from(rows.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let loaded = sink.finish().await.map_err(|e| e.to_string())?;
    let stream = c
        .copy_out(&format!(
            "COPY (SELECT id, note FROM {table} WHERE id >= 100 ORDER BY id) TO STDOUT"
        ))
        .await
        .map_err(|e| e.to_string())?;
    futures::pin_mut!(stream);
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    Ok(vec![Check::new(
        "copy",
        loaded == 200 && got == rows.as_bytes(),
        format!("{loaded} rows in, {} bytes out", got.len()),
    )])
}

/// What the other sessions are doing, for a failure message.
async fn activity(watcher: &Client) -> String {
    match watcher
        .simple_query(
            "SELECT string_agg(pid || ' ' || state || ': ' || left(query, 60), '; ') \
             FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid()",
        )
        .await
    {
        Ok(msgs) => msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default(),
        Err(e) => format!("({e})"),
    }
}

/// Whether a statement containing `marker` is running in another session.
async fn is_running(watcher: &Client, marker: &str) -> Result<bool, String> {
    watcher
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
            &[&marker],
        )
        .await
        .map(|r| r.get::<_, i64>(0) > 0)
        .map_err(|e| e.to_string())
}

async fn cancel(c: &Client, watcher: &Client, table: &str) -> Result<Vec<Check>, String> {
    let marker = format!("cancel_{table}");
    let sql = format!("SELECT pg_sleep(20) /* {marker} */");
    let sleeper = c.simple_query(&sql);
    futures::pin_mut!(sleeper);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Poll the sleep alongside, so it is really sent and running before the cancel.
    loop {
        tokio::select! {
            r = &mut sleeper => {
                return Ok(vec![Check::new("cancel", false, format!("sleep ended early: {r:?}"))]);
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if is_running(watcher, &marker).await? {
            break;
        }
        if Instant::now() > deadline {
            let seen = activity(watcher).await;
            // Do not leave the sleep holding a server for the workloads after this one.
            let _ = c.cancel_token().cancel_query(NoTls).await;
            return Ok(vec![Check::new(
                "cancel",
                false,
                format!("the sleep never started; active: {seen}"),
            )]);
        }
    }
    let start = Instant::now();
    c.cancel_token()
        .cancel_query(NoTls)
        .await
        .map_err(|e| format!("cancel_query: {e}"))?;
    let got = match tokio::time::timeout(Duration::from_secs(15), sleeper).await {
        Ok(Ok(_)) => "finished".to_string(),
        Ok(Err(e)) => code(&e),
        Err(_) => "no answer".to_string(),
    };
    let took = start.elapsed();
    let usable = c
        .query_one("SELECT 'alive'::text", &[])
        .await
        .map(|r| r.get::<_, String>(0) == "alive")
        .unwrap_or(false);
    Ok(vec![Check::new(
        "cancel",
        got == SqlState::QUERY_CANCELED.code() && usable,
        format!("SQLSTATE {got} after {took:.3?}, usable={usable}"),
    )])
}
