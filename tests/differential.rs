//! Differential workload tests: each configuration runs for PGSLUICE_DIFF_SECS (default 12 s)
//! with 4x as many clients as server connections unless noted; any wrong answer, stall,
//! undocumented error or leak fails it. PGSLUICE_DIFF_SEED repeats a run's random choices.
//! A summary table is printed per configuration (`--no-capture` to see it on success).
//! Long runs of every configuration: `cargo bench --bench difftest -- --secs 600`.

mod common;
#[path = "differential/mod.rs"]
mod diff;

use diff::configs;

macro_rules! config_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                diff::check(configs::by_name(stringify!($name)).expect("configuration")).await;
            }
        )*
        /// Every configuration has its test.
        #[test]
        fn every_configuration_is_tested() {
            let tested = [$(stringify!($name)),*];
            for c in configs::all() {
                assert!(tested.contains(&c.name), "no test for configuration {}", c.name);
            }
        }
    };
}

config_tests!(
    direct_baseline,
    direct_terminate,
    txn_pool4_equal,
    txn_pool_above_active,
    txn_pool_below_active,
    txn_tiny_pool1,
    txn_tiny_pool2,
    txn_defaults,
    session_equal,
    session_oversubscribed,
    txn_faults_terminate,
    txn_faults_restart,
    session_faults,
    txn_one_thread,
    txn_two_hosts,
);
