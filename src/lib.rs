//! pgsluice: a PostgreSQL wire-protocol proxy that pools connections and guards the
//! database's concurrency.

pub mod admin;
pub mod auth;
pub mod guard;
pub mod metrics;
pub mod protocol;
