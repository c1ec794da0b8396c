//! How long does a backend keep running a query after its client disappears?
//!
//! For every try and every target in turn, a raw protocol client starts
//! `SELECT pg_sleep(10)` carrying a unique tag, waits until the query is running, then closes
//! its socket. A separate direct monitoring connection polls `pg_stat_activity` until no active
//! backend runs the tagged query any more, or the per-try cap expires. Leftover tagged backends
//! are terminated before the next try so a capped try never overlaps the next one.
//!
//! Usage (normally through benches/cancel_latency.sh):
//!   cargo bench --bench cancel_latency -- --target direct=URL --target pgsluice=URL [--tries N]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use clap::Parser;
use pgsluice::protocol::{self, MAX_AUTH_MESSAGE_LEN};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

/// Time the client keeps its query running before it vanishes.
const HOLD: Duration = Duration::from_millis(300);
/// How often pg_stat_activity is polled.
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for a freshly sent query to show up as active.
const START_LIMIT: Duration = Duration::from_secs(5);
/// Longest wait for leftover backends to go after pg_terminate_backend.
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(about = "Backend run time after client disconnect, per target")]
struct Args {
    /// NAME=postgres://user@127.0.0.1:PORT/db (repeatable; run in the given order)
    #[arg(long = "target", required = true, value_parser = parse_target)]
    targets: Vec<Target>,
    /// Direct PostgreSQL URL for monitoring (default: the target named "direct")
    #[arg(long)]
    monitor: Option<String>,
    /// Tries per target
    #[arg(long, default_value_t = 20)]
    tries: u32,
    /// Per-try limit in milliseconds; slower tries count as still running
    #[arg(long, default_value_t = 3000)]
    cap_ms: u64,
    /// Smoke run: 3 tries
    #[arg(long)]
    quick: bool,
    /// Markdown output file
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Debug)]
struct Target {
    name: String,
    url: String,
    addr: String,
    user: String,
    db: String,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (name, raw) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=URL, got {s:?}"))?;
    let url = url::Url::parse(raw).map_err(|e| format!("{raw}: {e}"))?;
    let host = url.host_str().ok_or("URL has no host")?;
    if host != "127.0.0.1" && host != "localhost" {
        return Err(format!("{raw}: loopback targets only"));
    }
    let port = url.port().unwrap_or(5432);
    let user = match url.username() {
        "" => "postgres".to_owned(),
        u => u.to_owned(),
    };
    let db = match url.path().trim_start_matches('/') {
        "" => user.clone(),
        d => d.to_owned(),
    };
    Ok(Target {
        name: name.to_owned(),
        url: raw.to_owned(),
        addr: format!("127.0.0.1:{port}"),
        user,
        db,
    })
}

/// Opens a protocol-3 session (trust auth) and returns the socket at ReadyForQuery.
async fn open_raw(t: &Target) -> Result<TcpStream> {
    let mut sock = TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    let mut buf = BytesMut::new();
    protocol::startup_message(
        &mut buf,
        &[
            ("user", &t.user),
            ("database", &t.db),
            ("application_name", "cancel_latency"),
        ],
    );
    sock.write_all(&buf).await?;
    loop {
        let (tag, body) = protocol::read_message(&mut sock, MAX_AUTH_MESSAGE_LEN)
            .await
            .map_err(|e| anyhow!("{}: startup: {e}", t.name))?;
        match tag {
            b'R' if body.len() >= 4 && body[..4] == [0, 0, 0, 0] => {}
            b'R' => bail!("{}: server asks for a password; use trust auth", t.name),
            b'E' => {
                let f = protocol::parse_error_fields(&body);
                bail!("{}: startup refused: {} {}", t.name, f.code, f.message);
            }
            b'Z' => return Ok(sock),
            _ => {}
        }
    }
}

const ACTIVE_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE state = 'active' AND pid <> pg_backend_pid() AND strpos(query, $1) > 0";

async fn active_count(mon: &Client, tag: &str) -> Result<i64> {
    Ok(mon.query_one(ACTIVE_SQL, &[&tag]).await?.get(0))
}

/// Terminates every backend whose query carries `pattern`, then waits until they are gone.
async fn terminate_tagged(mon: &Client, pattern: &str) -> Result<()> {
    mon.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND strpos(query, $1) > 0 AND state <> 'idle'",
        &[&pattern],
    )
    .await?;
    let deadline = Instant::now() + CLEANUP_LIMIT;
    while Instant::now() < deadline {
        if active_count(mon, pattern).await? == 0 {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("tagged backends still active {CLEANUP_LIMIT:?} after pg_terminate_backend")
}

/// One try: milliseconds from socket close until the backend stopped, or None at the cap.
async fn one_try(t: &Target, mon: &Client, tag: &str, cap: Duration) -> Result<Option<f64>> {
    let mut sock = tokio::time::timeout(START_LIMIT, open_raw(t))
        .await
        .map_err(|_| anyhow!("{}: startup timed out", t.name))??;
    let mut buf = BytesMut::new();
    protocol::query(&mut buf, &format!("SELECT pg_sleep(10) /* {tag} */"));
    sock.write_all(&buf).await?;
    let sent = Instant::now();
    // The query must really be running before the client leaves, or a zero would be bogus.
    loop {
        if active_count(mon, tag).await? > 0 {
            break;
        }
        if sent.elapsed() > START_LIMIT {
            bail!("{}: tagged query never became active", t.name);
        }
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(HOLD.saturating_sub(sent.elapsed())).await;
    drop(sock);
    let closed = Instant::now();
    loop {
        if active_count(mon, tag).await? == 0 {
            return Ok(Some(closed.elapsed().as_secs_f64() * 1e3));
        }
        if closed.elapsed() >= cap {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Nearest-rank percentile over sorted samples where capped tries sort last.
fn percentile(sorted: &[Option<f64>], p: f64) -> Option<Option<f64>> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

fn fmt_ms(v: Option<Option<f64>>, cap_ms: u64) -> String {
    match v {
        None => "-".to_owned(),
        Some(None) => format!(">= {cap_ms}"),
        Some(Some(ms)) => format!("{ms:.1}"),
    }
}

fn sort_samples(samples: &mut [Option<f64>]) {
    samples.sort_by(|a, b| match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
}

fn render(args: &Args, tries: u32, results: &mut [(String, Vec<Option<f64>>, u32)]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Backend run time after client disconnect\n\n\
         `SELECT pg_sleep(10)` started, client socket closed after {} ms, time until \
         `pg_stat_activity` no longer shows it active (polled every {} ms). \
         {tries} interleaved tries per target, cap {} ms. Pool size 4, transaction mode.\n",
        HOLD.as_millis(),
        POLL.as_millis(),
        args.cap_ms
    );
    md.push_str("| target | tries | p50 ms | p99 ms | max ms | still running at cap | errors |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (name, samples, errors) in results.iter_mut() {
        sort_samples(samples);
        let capped = samples.iter().filter(|s| s.is_none()).count();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {capped} | {errors} |",
            samples.len(),
            fmt_ms(percentile(samples, 50.0), args.cap_ms),
            fmt_ms(percentile(samples, 99.0), args.cap_ms),
            fmt_ms(percentile(samples, 100.0), args.cap_ms),
        );
    }
    md
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tries = if args.quick { 3 } else { args.tries };
    let cap = Duration::from_millis(args.cap_ms);
    let monitor_url = match &args.monitor {
        Some(u) => u.clone(),
        None => args
            .targets
            .iter()
            .find(|t| t.name == "direct")
            .map(|t| t.url.clone())
            .ok_or_else(|| anyhow!("no --monitor and no target named direct"))?,
    };
    let (mon, conn) = tokio_postgres::connect(&monitor_url, NoTls)
        .await
        .context("monitor connection")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("monitor connection ended: {e}");
        }
    });

    // Unique per run so stale backends of an earlier run never match.
    let nonce = format!(
        "cl{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let mut results: Vec<(String, Vec<Option<f64>>, u32)> = args
        .targets
        .iter()
        .map(|t| (t.name.clone(), Vec::new(), 0))
        .collect();
    let n = args.targets.len();
    for i in 0..tries {
        // Rotate the starting target so no target always runs right after the same one.
        for k in 0..n {
            let idx = (i as usize + k) % n;
            let t = &args.targets[idx];
            terminate_tagged(&mon, &nonce).await?;
            let tag = format!("{nonce}-{i}-{}", t.name);
            match one_try(t, &mon, &tag, cap).await {
                Ok(v) => {
                    let shown = v.map_or(format!(">= {}", args.cap_ms), |ms| format!("{ms:.1}"));
                    eprintln!("try {}/{tries} {}: {shown} ms", i + 1, t.name);
                    results[idx].1.push(v);
                }
                Err(e) => {
                    eprintln!("try {}/{tries} {}: error: {e:#}", i + 1, t.name);
                    results[idx].2 += 1;
                }
            }
        }
    }
    terminate_tagged(&mon, &nonce).await?;

    let md = render(&args, tries, &mut results);
    print!("{md}");
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench-results/cancel-latency.md")
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&out, &md).with_context(|| format!("write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    if results.iter().any(|r| r.2 > 0) {
        bail!("some tries failed (see errors column)");
    }
    Ok(())
}
