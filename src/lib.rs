//! pgsluice: a PostgreSQL wire-protocol proxy that pools connections and guards the
//! database's concurrency.
//!
//! Without the default `server` feature only [`protocol`], [`auth`] and [`config`] are built
//! (the parsers the fuzz targets exercise).

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
mod admin_backend;
pub mod auth;
#[cfg(feature = "server")]
pub mod cancel;
pub mod config;
#[cfg(feature = "server")]
pub mod console;
#[cfg(feature = "server")]
pub mod demo;
#[cfg(feature = "server")]
pub mod guard;
#[cfg(feature = "server")]
pub mod handshake;
#[cfg(feature = "server")]
mod memtrim;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod pool;
pub mod protocol;
#[cfg(feature = "server")]
pub mod run;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod state;
pub mod tls;
#[cfg(feature = "server")]
pub mod top;
#[cfg(feature = "server")]
pub mod upstream;
