//! One server connection and the relay buffers that travel with it.

use super::PoolError;
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
    pub prepared: super::conn_state::ServerStatements,
    /// Session parameters the proxy applied here (transaction pooling).
    pub params: super::conn_state::ParamSet,
    /// Set at checkout, cleared by the first batch: until the server answers that batch,
    /// a failure means the connection was already dead and the batch may go elsewhere.
    pub untried: bool,
    /// Startup parameters it logged in with beyond the pool's usual ones (session pooling;
    /// boxed: every session future holds a connection's place).
    pub login: Option<Box<super::conn_state::ParamSet>>,
    /// Keeps the connection in its pool's `SHOW SERVERS` list while it lives.
    pub ticket: Option<super::stats::ServerTicket>,
    /// Which upstream host it is on, counted there while the connection lives (boxed: every
    /// session future holds a connection's place).
    pub host: Option<Box<crate::upstream::OpenOnHost>>,
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
            untried: false,
            login: None,
            ticket: None,
            host: None,
        }
    }

    /// Checkout check. A pooled connection sits at a clean ReadyForQuery with no client,
    /// so its server has nothing to say: any byte (a FATAL from pg_terminate_backend,
    /// idle_session_timeout or a shutdown), EOF or error means it is dead or out of step.
    /// Readiness-based: no system call unless the reactor saw the socket readable.
    pub fn check_idle(&mut self) -> Result<(), PoolError> {
        let mut b = [0u8; 64];
        match self.stream.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.untried = true;
                Ok(())
            }
            _ => {
                self.broken = true;
                Err(PoolError::Stale)
            }
        }
    }
}
