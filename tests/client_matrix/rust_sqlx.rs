//! sqlx workload, in-process. Default settings: every `sqlx::query` is persistent, i.e.
//! prepared once per connection as a named statement (`sqlx_s_1`, ...) and kept in the
//! connection's statement cache.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use sqlx::{Connection, PgConnection, Row};

use super::report::Check;
use super::{REPEAT, WORKLOAD_LIMIT};

fn code(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .map(|c| c.into_owned())
            .unwrap_or_else(|| "no SQLSTATE".into()),
        other => format!("not a database error ({other})"),
    }
}

fn err(e: sqlx::Error) -> String {
    e.to_string()
}

pub async fn run(url: &str, mode: &str, table: &str, conns: usize) -> Vec<Check> {
    let mut out = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..=conns {
        match PgConnection::connect(url).await {
            Ok(c) => clients.push(c),
            Err(e) => {
                out.push(Check::new("connect", false, e.to_string()));
                return out;
            }
        }
    }
    out.push(Check::new("connect", true, format!("{conns} connections")));
    let mut tx_client = clients.pop().expect("one extra connection");
    let create = format!("CREATE TABLE {table} (id int PRIMARY KEY, note text)");
    if let Err(e) = sqlx::raw_sql(&create).execute(&mut clients[0]).await {
        out.push(Check::new("setup", false, e.to_string()));
        return out;
    }
    match tokio::time::timeout(WORKLOAD_LIMIT, prepared(&mut clients, mode)).await {
        Ok(Ok(c)) => out.extend(c),
        Ok(Err(e)) => out.push(Check::new("prepared", false, e)),
        Err(_) => out.push(Check::new("prepared", false, "timed out")),
    }
    let (first, rest) = clients.split_at_mut(1);
    let other = &mut rest[0];
    let steps: [(&str, Result<Check, String>); 3] = [
        (
            "rollback",
            timed(rollback(&mut tx_client, other, table)).await,
        ),
        (
            "error_in_tx",
            timed(error_in_tx(&mut tx_client, other, table)).await,
        ),
        ("copy", timed(copy(&mut first[0], table)).await),
    ];
    for (name, r) in steps {
        out.push(r.unwrap_or_else(|e| Check::new(name, false, e)));
    }
    out.push(Check::not_applicable(
        "cancel",
        "sqlx has no API to cancel a running query (dropping its future sends no \
         CancelRequest)",
    ));
    let _ = sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&mut clients[0])
        .await;
    for c in clients {
        let _ = c.close().await;
    }
    let _ = tx_client.close().await;
    out
}

async fn timed(
    f: impl std::future::Future<Output = Result<Check, String>>,
) -> Result<Check, String> {
    tokio::time::timeout(WORKLOAD_LIMIT, f)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn prepared(clients: &mut [PgConnection], mode: &str) -> Result<Vec<Check>, String> {
    let n_conns = clients.len();
    let work = clients.iter_mut().enumerate().map(|(k, c)| async move {
        let mut pids = HashSet::new();
        for i in 0..REPEAT {
            let n = (k * 1000 + i) as i32;
            let row = sqlx::query("SELECT $1::int * 2, pg_backend_pid()")
                .bind(n)
                .fetch_one(&mut *c)
                .await
                .map_err(err)?;
            let got: i32 = row.try_get(0).map_err(err)?;
            if got != n * 2 {
                return Err(format!("connection {k} run {i}: got {got}, want {}", n * 2));
            }
            pids.insert(row.try_get::<i32, _>(1).map_err(err)?);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, String>(pids)
    });
    let per_conn = futures::future::try_join_all(work).await?;
    Ok(vec![
        Check::new(
            "prepared",
            true,
            format!(
                "{n_conns} connections x {REPEAT} executions of a cached statement, values checked"
            ),
        ),
        super::placement(
            mode,
            &per_conn.iter().map(|p| p.len()).collect::<Vec<_>>(),
            per_conn.iter().flatten().collect::<HashSet<_>>().len(),
        ),
    ])
}

async fn count(c: &mut PgConnection, table: &str, id: i32) -> Result<i64, String> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE id = $1"))
        .bind(id)
        .fetch_one(c)
        .await
        .map_err(err)
}

async fn rollback(
    c: &mut PgConnection,
    other: &mut PgConnection,
    table: &str,
) -> Result<Check, String> {
    let mut tx = c.begin().await.map_err(err)?;
    sqlx::query(&format!("INSERT INTO {table} (id, note) VALUES ($1, $2)"))
        .bind(1i32)
        .bind("rolled back")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    tx.rollback().await.map_err(err)?;
    let n = count(other, table, 1).await?;
    Ok(Check::new(
        "rollback",
        n == 0,
        format!("rows after ROLLBACK: {n}"),
    ))
}

async fn error_in_tx(
    c: &mut PgConnection,
    other: &mut PgConnection,
    table: &str,
) -> Result<Check, String> {
    let mut tx = c.begin().await.map_err(err)?;
    sqlx::query(&format!(
        "INSERT INTO {table} (id, note) VALUES (2, 'doomed')"
    ))
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    let first = match sqlx::query("SELECT 1 / $1::int")
        .bind(0i32)
        .fetch_one(&mut *tx)
        .await
    {
        Ok(_) => "none".to_string(),
        Err(e) => code(&e),
    };
    let second = match sqlx::query("SELECT 1").fetch_one(&mut *tx).await {
        Ok(_) => "none".to_string(),
        Err(e) => code(&e),
    };
    tx.rollback().await.map_err(err)?;
    let usable = sqlx::query_scalar::<_, i32>("SELECT 41 + $1::int")
        .bind(1i32)
        .fetch_one(&mut *c)
        .await
        .map(|v| v == 42)
        .unwrap_or(false);
    let n = count(other, table, 2).await?;
    let ok = first == "22012" && second == "25P02" && usable && n == 0;
    Ok(Check::new(
        "error_in_tx",
        ok,
        format!("{first} then {second}, ROLLBACK, usable={usable}, rows={n}"),
    ))
}

async fn copy(c: &mut PgConnection, table: &str) -> Result<Check, String> {
    let rows: String = (0..200)
        .map(|i| format!("{}\tline {i}\n", 100 + i))
        .collect();
    let mut sink = c
        .copy_in_raw(&format!("COPY {table} (id, note) FROM STDIN"))
        .await
        .map_err(err)?;
    sink.send(rows.as_bytes()).await.map_err(err)?;
    let loaded = sink.finish().await.map_err(err)?;
    let mut got = Vec::new();
    {
        let mut stream = c
            .copy_out_raw(&format!(
                "COPY (SELECT id, note FROM {table} WHERE id >= 100 ORDER BY id) TO STDOUT"
            ))
            .await
            .map_err(err)?;
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.map_err(err)?);
        }
    }
    Ok(Check::new(
        "copy",
        loaded == 200 && got == rows.as_bytes(),
        format!(
            "{loaded} rows in, {} bytes out (copy_in_raw / copy_out_raw)",
            got.len()
        ),
    ))
}
