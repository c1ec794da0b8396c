//! Heap allocations pgsluice makes per steady-state query, by protocol (issue: zero per
//! query). A counting global allocator counts only on the proxy runtime's threads (a
//! thread-local flag set when each worker starts), so the client driver in the same process
//! is not counted. The proxy's idle background work over the same time is measured first and
//! subtracted.
//!
//! `cargo bench --bench allocs [-- --queries N]` (needs PostgreSQL's server programs, as the
//! tests do; runs as root by starting the cluster as the postgres user).

#[path = "../tests/alloc_count/mod.rs"]
mod alloc_count;
#[path = "../tests/common/mod.rs"]
mod common;

use alloc_count::{run, start_counted_proxy, Mode, ALLOCS, TRACE_LEFT};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn main() {
    let mut queries = 20_000usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--queries") {
        queries = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--queries N");
    }
    if args.iter().any(|a| a == "--test" || a == "--quick") {
        queries = 500;
    }
    let trace: u64 = std::env::var("ALLOCS_TRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pg = common::TempPostgres::new();
    let (proxy_rt, handle, url) = start_counted_proxy(&pg.url());
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    println!("allocations by the proxy per query, {queries} queries per mode, one client");
    println!("| mode | queries/s | proxy allocations per query |");
    println!("|---|---:|---:|");
    client_rt.block_on(async {
        let c = common::connect(&url).await;
        let st = c.prepare("SELECT $1::int4 + 1").await.expect("prepare");
        for mode in [Mode::Simple, Mode::Extended, Mode::Prepared] {
            // Warm-up: pools, statement caches and buffers reach their steady size.
            run(&c, &st, mode, 1000.min(queries)).await;
            let t0 = Instant::now();
            let before = ALLOCS.load(Ordering::Relaxed);
            // Traced, if asked, in the second half: the first one still grows buffers.
            run(&c, &st, mode, queries / 2).await;
            TRACE_LEFT.store(trace, Ordering::Relaxed);
            run(&c, &st, mode, queries - queries / 2).await;
            TRACE_LEFT.store(0, Ordering::Relaxed);
            let took = t0.elapsed();
            let during = ALLOCS.load(Ordering::Relaxed) - before;
            // The proxy's own background work over the same time, with no queries.
            let idle0 = ALLOCS.load(Ordering::Relaxed);
            tokio::time::sleep(took.min(Duration::from_secs(5))).await;
            let idle = (ALLOCS.load(Ordering::Relaxed) - idle0) as f64
                * (took.as_secs_f64() / took.min(Duration::from_secs(5)).as_secs_f64());
            let per = (during as f64 - idle).max(0.0) / queries as f64;
            println!(
                "| {} | {:.0} | {:.2} (background {:.0} over the run) |",
                mode.name(),
                queries as f64 / took.as_secs_f64(),
                per,
                idle
            );
        }
    });
    proxy_rt.block_on(handle.shutdown());
}
