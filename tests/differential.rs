//! Differential workload tests: each configuration runs for PGSLUICE_DIFF_SECS (default 12 s)
//! with 4x as many clients as server connections unless noted; any wrong answer, stall,
//! undocumented error or leak fails it. PGSLUICE_DIFF_SEED repeats a run's random choices.
//! A summary table is printed per configuration (`--no-capture` to see it on success).

mod common;
#[path = "differential/mod.rs"]
mod diff;

use diff::{check, Config, Faults, Mode};

/// Clients straight to PostgreSQL, with cancels and kills: proves the oracle itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_baseline_validates_the_oracle() {
    let mut c = Config::new("direct_baseline", Mode::Direct, Some(4), None);
    c.faults = Faults { cancel: true, kill: true, ..Faults::default() };
    c.secs = c.secs.min(6.0);
    check(c).await;
}
