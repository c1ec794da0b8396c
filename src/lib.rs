//! pgsluice: a PostgreSQL wire-protocol proxy that pools connections and guards the
//! database's concurrency.

pub mod admin;
mod admin_backend;
pub mod auth;
pub mod cancel;
pub mod config;
pub mod demo;
pub mod guard;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod run;
pub mod server;
pub mod session;
pub mod tls;
