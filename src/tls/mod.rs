//! TLS on both sides: the client-facing acceptor (certificates re-read on reload), the
//! upstream connector chosen by the URL's `sslmode`, the stream types the session relays
//! over, and the channel-binding data for SCRAM-SHA-256-PLUS.
//!
//! Only `params` (setting values, used by the configuration parser) is built without the
//! `server` feature.

/// The TLS settings are configuration (`config::tls_params`); named here as before.
pub use crate::config::tls_params as params;

#[cfg(feature = "server")]
mod acceptor;
#[cfg(feature = "server")]
pub mod binding;
#[cfg(feature = "server")]
pub mod stream;
#[cfg(feature = "server")]
pub mod upstream;

#[cfg(all(test, feature = "server"))]
mod tests;

#[cfg(feature = "server")]
pub use acceptor::*;
#[cfg(feature = "server")]
pub use stream::{ClientStream, ServerStream};
