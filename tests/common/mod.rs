//! Shared helpers for integration tests: throwaway PostgreSQL clusters and a fault-injecting
//! TCP shim. Each test binary uses a different subset.
#![allow(dead_code)]

pub mod pg;
pub mod proxy;
pub mod shim;

pub use pg::{connect, try_connect, HostAuth, TempPostgres};
pub use proxy::TestProxy;
pub use shim::{FaultShim, Mode};
