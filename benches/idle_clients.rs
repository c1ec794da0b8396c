//! Opens N client connections that complete the PostgreSQL start-up (trust auth) and then sit
//! idle, so the memory a proxy spends per idle client can be read from its RSS.
//!
//! Prints `READY ok=N failed=M` once every connection has either reached ReadyForQuery or
//! failed, then holds them for `--hold` seconds (or until killed) and exits non-zero when any
//! connection failed.
//!
//! `cargo bench --bench idle_clients -- --addr 127.0.0.1:6432 --clients 1000 --hold 30`

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use clap::Parser;
use pgsluice::protocol::{build, parse_error_fields, read_message};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Hold N idle PostgreSQL client connections open")]
struct Args {
    /// host:port of the server or proxy (loopback).
    #[arg(long)]
    addr: Option<String>,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value = "postgres")]
    user: String,
    #[arg(long, default_value = "postgres")]
    database: String,
    /// Seconds to hold the connections after they are all up (at most 3600).
    #[arg(long, default_value_t = 30)]
    hold: u64,
    /// Connections in start-up at the same time.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Per-connection start-up timeout, seconds.
    #[arg(long, default_value_t = 20)]
    timeout: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

async fn open_idle(addr: &str, user: &str, database: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    let mut buf = BytesMut::new();
    build::startup_message(
        &mut buf,
        &[
            ("user", user),
            ("database", database),
            ("application_name", "idle_clients"),
        ],
    );
    s.write_all(&buf).await?;
    // Bounded: each read is bounded in size and the caller applies a timeout.
    loop {
        let (tag, body) = read_message(&mut s, 64 * 1024).await?;
        match tag {
            b'R' => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if code != Some(0) {
                    bail!("server asks for authentication code {code:?}; only trust is supported");
                }
            }
            b'E' => {
                let f = parse_error_fields(&body);
                bail!("{} {}: {}", f.severity, f.code, f.message);
            }
            b'Z' => return Ok(s),
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let Some(addr) = args.addr.clone() else {
        println!("idle_clients: no --addr given; nothing to do (see benches/README.md)");
        return Ok(());
    };
    let sem = Arc::new(Semaphore::new(args.parallel.max(1)));
    let mut tasks = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let sem = sem.clone();
        let (addr, user, db) = (addr.clone(), args.user.clone(), args.database.clone());
        let limit = Duration::from_secs(args.timeout);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            match tokio::time::timeout(limit, open_idle(&addr, &user, &db)).await {
                Ok(r) => r,
                Err(_) => bail!("start-up timed out"),
            }
        }));
    }
    let mut held = Vec::with_capacity(args.clients);
    let mut failed = 0usize;
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    println!("READY ok={} failed={}", held.len(), failed);
    if let Some(e) = &first_err {
        eprintln!("first failure: {e}");
    }
    std::io::stdout().flush()?;
    tokio::time::sleep(Duration::from_secs(args.hold.min(3600))).await;
    for mut s in held {
        let mut b = BytesMut::new();
        build::terminate(&mut b);
        let _ = s.write_all(&b).await;
    }
    if failed > 0 {
        bail!("{failed} of {} connections failed", args.clients);
    }
    Ok(())
}
