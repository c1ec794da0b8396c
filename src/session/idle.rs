//! An attached server that speaks while its client is idle: session mode's NOTIFY and
//! ParameterStatus, and, in either mode, the FATAL a terminated backend sends before it
//! closes. The client gets it when it happens, as on a direct connection, not at its next
//! query (which would put it out of step).

use super::*;

/// Reads per wake-up at most; the rest waits for the next readiness.
const MAX_READS: usize = 16;

impl Session {
    /// The attached server's socket is readable while the client is idle: forward what
    /// it sent. False when the session is over (the server was terminated or closed, or
    /// the client is gone).
    pub(super) async fn server_spoke(&mut self) -> bool {
        let Some(server) = self.server.as_mut() else {
            return true;
        };
        let mut closed = false;
        for _ in 0..MAX_READS {
            if !self.st.s2c.has_spare() {
                break;
            }
            // Taking spare room may rewind an empty buffer to offset 0: read `end` after it.
            let _ = self.st.s2c.spare();
            let from = self.st.s2c.end;
            match server.stream.try_read(self.st.s2c.spare()) {
                Ok(0) => closed = true,
                Ok(n) => {
                    self.st.s2c.end += n;
                    if self.st.scan_server(from, &mut server.prepared).is_err() {
                        closed = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => closed = true,
            }
            if closed {
                break;
            }
        }
        // Readiness left over from the relay's last read often finds nothing here.
        let sent = match self.st.s2c.is_empty() {
            true => Ok(()),
            false => startup::send(&mut self.client, self.st.s2c.data()).await,
        };
        self.st.s2c.clear();
        if sent.is_err() {
            self.st.client_eof = true;
            return false;
        }
        let fatal = self.st.server_fatal && self.st.sscan.at_boundary();
        if !closed && !fatal {
            self.st.release_buffers();
            return true;
        }
        // A backend that sent FATAL closes next; one that closed without a word is lost.
        info!(identity = %self.identity, fatal, "server connection ended while the client was idle");
        if let Some(mut s) = self.server.take() {
            s.broken = true;
        }
        if !fatal {
            startup::send_fatal(
                &mut self.client,
                "08006",
                "pgsluice: lost connection to upstream",
            )
            .await;
        }
        self.st.server_fatal = false;
        self.st.fatal_to_client = false;
        false
    }
}
