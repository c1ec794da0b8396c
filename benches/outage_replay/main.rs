//! Outage replay: what a database behind each target does when offered load climbs past its
//! saturation point and clients give up and retry, as in a real incident.
//!
//! 1. Calibrates the per-query work (a range sum over pgbench_accounts) to `--query-ms`.
//! 2. Measures saturation: requests/s direct to the database with a closed loop.
//! 3. For every target, offers open-loop (Poisson) arrivals at each multiple of saturation in
//!    `--steps` for `--step` each, and records goodput, latency, errors and active backends.
//!
//! `cargo bench --bench outage_replay -- --monitor URL --target direct=URL --target pgbouncer=URL`

mod load;
mod report;

use anyhow::{bail, Context, Result};
use clap::Parser;
use load::{App, StepStats, Workload};
use parking_lot::Mutex;
use rand::Rng;
use report::Row;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(about = "Replay an overload outage against direct PostgreSQL and proxies")]
struct Args {
    /// NAME=URL, repeatable (e.g. direct=postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long = "target", value_parser = parse_target)]
    targets: Vec<(String, String)>,
    /// Direct database URL for calibration and pg_stat_activity sampling (default: the target
    /// named `direct`).
    #[arg(long)]
    monitor: Option<String>,
    /// Virtual users: requests in flight at most, each with its own connection.
    #[arg(long, default_value_t = 100)]
    vus: usize,
    /// Sequential queries per request.
    #[arg(long, default_value_t = 12)]
    queries: usize,
    /// Client deadline per attempt; then the connection is dropped and the request retried once.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Mean retry backoff (uniformly jittered between 0.5x and 1.5x).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    backoff: Duration,
    /// Offered load as multiples of the measured saturation rate.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4,7,10")]
    steps: Vec<f64>,
    /// Length of each step's arrival window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Target time of one query, used to pick the range size.
    #[arg(long, default_value_t = 3.0)]
    query_ms: f64,
    /// Rows per query; skips calibration.
    #[arg(long)]
    span: Option<i32>,
    /// Closed-loop workers when measuring saturation.
    #[arg(long, default_value_t = 8)]
    calib_concurrency: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    calib: Duration,
    /// Use this saturation rate (requests/s) instead of measuring it.
    #[arg(long)]
    saturation_rps: Option<f64>,
    /// Requests in flight in the generator beyond which arrivals are counted as overflow.
    #[arg(long, default_value_t = 20_000)]
    max_inflight: usize,
    #[arg(long, default_value = "bench-results")]
    out_dir: PathBuf,
    /// Seconds-long smoke run: short calibration, one 2 s step at 1x.
    #[arg(long)]
    quick: bool,
    /// Redraw goodput.svg in --out-dir from these outage CSV files (no load is run); needs
    /// --saturation-rps for the caption.
    #[arg(long, num_args = 1..)]
    replot: Vec<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_target(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or("expected NAME=URL")?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("bad target name {name:?}"));
    }
    let u = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
    match u.host_str() {
        Some("127.0.0.1") | Some("localhost") | Some("[::1]") => Ok((name.into(), url.into())),
        other => Err(format!("only loopback targets are allowed, got {other:?}")),
    }
}

async fn calibrate(monitor: &str, w: &mut Workload, query_ms: f64) -> Result<f64> {
    let conn = load::connect(monitor).await.map_err(anyhow::Error::msg)?;
    let mut span = w.span;
    let mut per = 0.0;
    // A few refinement rounds are enough: time is roughly linear in the span.
    for _ in 0..3 {
        let mut times = Vec::new();
        for i in 0..15 {
            let aid = 1 + (i * 37_003) % (w.max_aid - span).max(1);
            let t = Instant::now();
            conn.sum_range(aid, span)
                .await
                .map_err(anyhow::Error::msg)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        per = times[times.len() / 2];
        let next = ((span as f64) * query_ms / per.max(0.01)) as i64;
        let next = next.clamp(100, (w.max_aid / 2) as i64) as i32;
        if (next - span).abs() * 10 < span {
            break;
        }
        span = next;
    }
    w.span = span;
    Ok(per)
}

async fn saturation(monitor: &str, w: &Workload, workers: usize, dur: Duration) -> Result<f64> {
    let done = Arc::new(Mutex::new(0u64));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (url, w, done) = (monitor.to_string(), w.clone(), done.clone());
        set.spawn(async move {
            let conn = load::connect(&url).await?;
            while start.elapsed() < dur {
                load::run_request(&conn, &w).await?;
                *done.lock() += 1;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r?.map_err(anyhow::Error::msg)?;
    }
    let n = *done.lock();
    if n == 0 {
        bail!("no request completed while measuring saturation");
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

const ACTIVE_SQL: &str = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
     AND backend_type = 'client backend' AND pid <> pg_backend_pid()";

/// Samples active backends every 200 ms into the current step's statistics.
fn spawn_sampler(
    monitor: String,
    cur: Arc<Mutex<Arc<Mutex<StepStats>>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(conn) = load::connect(&monitor).await else {
            eprintln!("warning: active-backend sampler could not connect");
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if let Ok(Some(n)) = conn.count(ACTIVE_SQL).await {
                let stats = cur.lock().clone();
                stats.lock().active.push(n);
            }
        }
    })
}

async fn run_step(
    app: &Arc<App>,
    w: &Workload,
    rate: f64,
    args: &Args,
    stats: Arc<Mutex<StepStats>>,
) {
    let mut set = JoinSet::new();
    let start = tokio::time::Instant::now();
    let end = start + args.step;
    let mut next = start;
    loop {
        let gap = -(1.0 - rand::thread_rng().gen::<f64>()).ln() / rate;
        next += Duration::from_secs_f64(gap);
        if next >= end {
            break;
        }
        tokio::time::sleep_until(next).await;
        stats.lock().arrivals += 1;
        if set.len() >= args.max_inflight {
            stats.lock().overflow += 1;
            continue;
        }
        let (app, w, stats) = (app.clone(), w.clone(), stats.clone());
        set.spawn(async move {
            let o = app.request(&w, Instant::now()).await;
            stats.lock().record(o);
        });
        // Reap finished tasks so the set does not grow with the whole step.
        while set.try_join_next().is_some() {}
    }
    // Every request ends within two deadlines plus a backoff; give it that and a margin.
    let drain = args.deadline * 2 + args.backoff * 2 + Duration::from_secs(2);
    let drained =
        tokio::time::timeout(drain, async { while set.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let left = set.len() as u64;
        set.abort_all();
        let mut s = stats.lock();
        s.failed += left;
        *s.errors.entry("unfinished".into()).or_default() += left;
    }
}

/// Waits (bounded) until the database has no active client backends left from a target.
async fn settle(monitor: &str) {
    let Ok(conn) = load::connect(monitor).await else {
        return;
    };
    for _ in 0..60 {
        if let Ok(Some(0)) = conn.count(ACTIVE_SQL).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("warning: database still busy after 30 s of settling");
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if !args.replot.is_empty() {
        let sat = args
            .saturation_rps
            .context("--replot needs --saturation-rps")?;
        let mut rows = Vec::new();
        for f in &args.replot {
            rows.extend(report::read_csv(f)?);
        }
        let svg = args.out_dir.join("goodput.svg");
        report::plot(&svg, &rows, sat)?;
        println!("{}\nwrote {}", report::markdown(&rows), svg.display());
        return Ok(());
    }
    if args.targets.is_empty() {
        println!("outage_replay: no --target given; nothing to do (see benches/README.md)");
        return Ok(());
    }
    if args.quick {
        args.steps = vec![1.0];
        args.step = Duration::from_secs(2);
        args.calib = Duration::from_secs(1);
    }
    let monitor = match &args.monitor {
        Some(m) => m.clone(),
        None => args
            .targets
            .iter()
            .find(|(n, _)| n == "direct")
            .map(|(_, u)| u.clone())
            .context("give --monitor URL or a target named direct")?,
    };
    parse_target(&format!("monitor={monitor}")).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.out_dir)?;

    let probe = load::connect(&monitor).await.map_err(anyhow::Error::msg)?;
    let max_aid = probe
        .count("SELECT max(aid)::bigint FROM pgbench_accounts")
        .await
        .context("pgbench_accounts missing: run pgbench -i first")?
        .context("pgbench_accounts is empty")? as i32;
    drop(probe);
    let mut w = Workload {
        queries: args.queries,
        span: args.span.unwrap_or(20_000).min(max_aid / 2).max(1),
        max_aid,
        deadline: args.deadline,
        backoff: args.backoff,
    };
    if args.span.is_none() {
        let ms = calibrate(&monitor, &mut w, args.query_ms).await?;
        println!(
            "calibrated: span {} rows, {ms:.2} ms per query (target {} ms)",
            w.span, args.query_ms
        );
    }
    let sat = match args.saturation_rps {
        Some(s) => s,
        None => saturation(&monitor, &w, args.calib_concurrency, args.calib).await?,
    };
    println!(
        "saturation: {sat:.1} requests/s direct ({} queries each, {} workers, {:?}); vus {}, deadline {:?}",
        w.queries, args.calib_concurrency, args.calib, args.vus, args.deadline
    );

    let mut all_rows = Vec::new();
    for (name, url) in args.targets.clone() {
        settle(&monitor).await;
        let app = Arc::new(App::new(&url, args.vus));
        let cur = Arc::new(Mutex::new(Arc::new(Mutex::new(StepStats::default()))));
        let sampler = spawn_sampler(monitor.clone(), cur.clone());
        let mut rows = Vec::new();
        for &mult in &args.steps {
            let stats = Arc::new(Mutex::new(StepStats::default()));
            *cur.lock() = stats.clone();
            let rate = (sat * mult).max(0.1);
            run_step(&app, &w, rate, &args, stats.clone()).await;
            let mut s = stats.lock().clone();
            let (am, ax) = s.active_mean_max();
            let row = Row {
                target: name.clone(),
                multiplier: mult,
                offered_rps: s.arrivals as f64 / args.step.as_secs_f64(),
                arrivals: s.arrivals,
                goodput_rps: s.success as f64 / args.step.as_secs_f64(),
                success: s.success,
                failed: s.failed,
                retries: s.retries,
                overflow: s.overflow,
                p50_ms: s.percentile_ms(0.50),
                p99_ms: s.percentile_ms(0.99),
                active_mean: am,
                active_max: ax,
                errors: s
                    .errors
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            println!("{}", report::csv_line(&row));
            rows.push(row);
        }
        sampler.abort();
        app.close_idle();
        report::write_csv(&args.out_dir.join(format!("outage-{name}.csv")), &rows)?;
        all_rows.extend(rows);
    }
    let svg = args.out_dir.join("goodput.svg");
    if args.quick {
        // The smoke run must show that every target served at least one full request.
        for (name, _) in &args.targets {
            if !all_rows.iter().any(|r| &r.target == name && r.success > 0) {
                bail!("target {name} completed no request");
            }
        }
    }
    report::plot(&svg, &all_rows, sat)?;
    let md = format!(
        "saturation {sat:.1} req/s direct; {} queries/request of ~{} rows; vus {}; deadline {:?}; step {:?}\n\n{}",
        w.queries,
        w.span,
        args.vus,
        args.deadline,
        args.step,
        report::markdown(&all_rows)
    );
    std::fs::write(args.out_dir.join("outage.md"), &md)?;
    println!("\n{md}\nwrote {} and outage-<target>.csv", svg.display());
    Ok(())
}
