//! The differential workload tester (issue 16): many seeded clients drive a random mix of
//! protocol features through pgsluice against a real PostgreSQL, and every answer is checked
//! against what PostgreSQL must return. Used by `tests/differential.rs` (CI) and
//! `benches/difftest` (long runs).
#![allow(dead_code, unused_imports)]

pub mod bulk;
pub mod client;
pub mod configs;
pub mod faults;
pub mod model;
pub mod ops;
pub mod run;
pub mod script;
pub mod session;
pub mod txn;
pub mod wire;

pub use run::{check, run, secs_from_env, seed_from_env, Config, Faults, Mode, Report};
