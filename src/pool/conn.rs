//! One server connection and the relay buffers that travel with it.

use crate::tls::ServerStream;
use std::net::SocketAddr;
use std::time::Instant;

pub struct ServerConn {
    pub id: u64,
    pub stream: ServerStream,
    /// Where CancelRequests for this backend go.
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    pub created: Instant,
    /// Set when the connection must not be reused (protocol state unknown, I/O error).
    pub broken: bool,
    /// Statements prepared here on behalf of clients (transaction pooling).
    pub prepared: crate::session::prepared::ServerStatements,
    /// Session parameters the proxy applied here (transaction pooling).
    pub params: crate::session::params::ParamSet,
    /// Startup parameters it logged in with beyond the pool's usual ones (session pooling;
    /// boxed: every session future holds a connection's place).
    pub login: Option<Box<crate::session::params::ParamSet>>,
}

impl ServerConn {
    pub fn new(id: u64, stream: ServerStream, addr: SocketAddr, pid: i32, secret: i32) -> Self {
        ServerConn {
            id,
            stream,
            addr,
            pid,
            secret,
            created: Instant::now(),
            broken: false,
            prepared: Default::default(),
            params: Default::default(),
            login: None,
        }
    }
}
