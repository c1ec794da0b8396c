//! Steady-state queries cost the proxy no heap allocation of its own, in simple, extended
//! (unnamed statement, Parse each time) and prepared mode. What remains is the metrics
//! exporter's histogram storage: it keeps samples in blocks and allocates a block every few
//! dozen samples, two samples per query (a fixed-bucket histogram of our own would remove it).
//! So the bound is one allocation per ten queries; before this test there were 2.03 per query.

#[path = "alloc_count/mod.rs"]
mod alloc_count;
mod common;

use alloc_count::{run, start_counted_proxy, Mode, ALLOCS};
use std::sync::atomic::Ordering;

#[test]
fn steady_state_queries_do_not_allocate() {
    let pg = common::TempPostgres::new();
    let (proxy_rt, handle, url) = start_counted_proxy(&pg.url());
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    const N: usize = 2000;
    let mut report = Vec::new();
    client_rt.block_on(async {
        let c = common::connect(&url).await;
        let st = c.prepare("SELECT $1::int4 + 1").await.expect("prepare");
        for mode in [Mode::Simple, Mode::Extended, Mode::Prepared] {
            run(&c, &st, mode, 300).await;
            let before = ALLOCS.load(Ordering::Relaxed);
            run(&c, &st, mode, N).await;
            let n = ALLOCS.load(Ordering::Relaxed) - before;
            report.push((mode.name(), n));
        }
    });
    proxy_rt.block_on(handle.shutdown());
    eprintln!("proxy allocations over {N} queries: {report:?}");
    for (mode, n) in report {
        assert!(
            n as usize <= N / 10,
            "{mode}: {n} allocations over {N} queries ({:.2} per query)",
            n as f64 / N as f64
        );
    }
}
