//! Wire format: framing, startup packets, the few messages the proxy inspects, and the
//! messages it builds itself.

pub mod build;
pub mod scan;
pub mod startup;

pub use build::*;
pub use scan::{FrameScanner, ScanEvent};
pub use startup::{read_message, read_startup, StartupPacket};

/// Longest message we accept from anyone. PostgreSQL itself caps messages at 1 GiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;
/// Longest startup packet (PostgreSQL uses 10000 as well).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Longest message accepted while authenticating (passwords, SASL exchanges).
pub const MAX_AUTH_MESSAGE_LEN: usize = 64 * 1024;

pub const PROTOCOL_VERSION_3: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unexpected message type '{}'", char::from(*.0))]
    Unexpected(u8),
}

impl ProtocolError {
    /// True when the peer simply went away (not worth logging as a violation).
    pub fn is_eof(&self) -> bool {
        matches!(self, ProtocolError::Io(e) if matches!(e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
    }
}
