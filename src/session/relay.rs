//! The relay: bytes flow client→server and server→client in bulk from two pooled buffers,
//! both sockets polled at once (so neither side can deadlock the other), while a header
//! scanner tracks the few protocol facts the proxy acts on: where batches end, each
//! ReadyForQuery and its transaction status, Terminate, fatal server errors.

use super::bufpool::Buf;
use crate::protocol::{self, FrameScanner, ProtocolError};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEvent {
    /// Nothing is in flight: every forwarded batch got its ReadyForQuery.
    Idle,
    /// The client closed its socket (or sent Terminate) with work possibly in flight.
    ClientGone,
    /// The server connection failed or closed.
    ServerGone(io::Error),
    /// The client broke the protocol.
    ClientProtocol(ProtocolError),
    /// The server sent something unparseable.
    ServerProtocol(ProtocolError),
}

/// Protocol state of one client's stream, kept for the session's lifetime.
pub struct RelayState {
    pub c2s: Buf,
    pub s2c: Buf,
    pub cscan: FrameScanner,
    pub sscan: FrameScanner,
    /// Offsets in `c2s` just past each unsent batch-ending message (Query, Sync, FunctionCall).
    ends: VecDeque<usize>,
    /// Forwarded batch ends still waiting for their ReadyForQuery.
    pub pending: usize,
    /// A non-ending extended-protocol message was seen after the last batch end.
    pub open_batch: bool,
    /// Transaction status from the last ReadyForQuery ('I', 'T' or 'E').
    pub status: u8,
    /// The client sent Terminate: read no more from it.
    pub terminated: bool,
    /// The client closed its socket.
    pub client_eof: bool,
    /// The server reported a FATAL error: do not reuse the connection.
    pub server_fatal: bool,
    /// Replace the next 57014 ErrorResponse with the proxy's own timeout message.
    pub rewrite_cancel: Option<&'static str>,
    /// Client bytes are being dropped until the current batch ends (after a refusal).
    pub discarding: bool,
    /// Set by the scan when a discarded batch has ended: answer it with ReadyForQuery.
    pub discard_done: bool,
    /// The Terminate message was cut in two by a read; part of it may be upstream.
    pub terminate_split: bool,
    /// The server sent an ErrorResponse during the current batch.
    pub saw_error: bool,
}

impl Default for RelayState {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayState {
    pub fn new() -> Self {
        RelayState {
            c2s: Buf::new(),
            s2c: Buf::new(),
            cscan: FrameScanner::new(b""),
            sscan: FrameScanner::new(b"ZE"),
            ends: VecDeque::new(),
            pending: 0,
            open_batch: false,
            status: b'I',
            terminated: false,
            client_eof: false,
            server_fatal: false,
            rewrite_cancel: None,
            discarding: false,
            discard_done: false,
            terminate_split: false,
            saw_error: false,
        }
    }

    /// Nothing buffered and nothing awaited from the server.
    pub fn is_idle(&self) -> bool {
        self.pending == 0
            && self.ends.is_empty()
            && !self.open_batch
            && self.c2s.is_empty()
            && self.s2c.is_empty()
            && self.cscan.at_boundary()
            && self.sscan.at_boundary()
    }

    /// Unsent client bytes are waiting (work to admit).
    pub fn has_client_work(&self) -> bool {
        !self.c2s.is_empty()
    }

    /// Returns pooled buffers when both are empty.
    pub fn release_buffers(&mut self) {
        self.c2s.release();
        self.s2c.release();
    }

    /// Scans client bytes just read at absolute offsets `from..c2s.end`.
    pub fn scan_client(&mut self, from: usize) -> Result<(), ProtocolError> {
        let mut cut_terminate: Option<usize> = None;
        let mut discard_to: Option<usize> = None;
        let mut split = false;
        let discarding = self.discarding;
        let ends = &mut self.ends;
        let open_batch = &mut self.open_batch;
        let chunk = self.c2s.filled_from(from);
        let mut flow = |tag: u8, start: Option<usize>, end: usize| {
            let abs_end = from + end;
            match tag {
                b'X' => {
                    match start {
                        Some(s) => cut_terminate = Some(from + s),
                        None => {
                            split = true;
                            cut_terminate = Some(from);
                        }
                    }
                    return ControlFlow::Break(());
                }
                b'Q' | b'S' | b'F' => {
                    if discarding && discard_to.is_none() {
                        discard_to = Some(abs_end);
                    } else {
                        ends.push_back(abs_end);
                    }
                    *open_batch = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => *open_batch = true,
                _ => {}
            }
            ControlFlow::Continue(())
        };
        self.cscan
            .scan(chunk, |ev| flow(ev.tag, ev.start, ev.end))?;
        if let Some(at) = cut_terminate {
            // Nothing after Terminate matters; never forward it (the server would close).
            self.c2s.end = at.max(self.c2s.pos);
            self.terminated = true;
            self.terminate_split = split;
        }
        if self.discarding {
            let drop_to = discard_to.unwrap_or(self.c2s.end);
            let base = self.c2s.pos;
            self.c2s.remove(base, drop_to);
            let shift = drop_to - base;
            for e in self.ends.iter_mut() {
                *e -= shift;
            }
            if discard_to.is_some() {
                self.discarding = false;
                self.discard_done = true;
                self.open_batch = false;
            }
        }
        Ok(())
    }

    /// Drops the first unsent batch (a refused query). Returns true when its end was in the
    /// buffer; otherwise everything was dropped and the rest is discarded as it arrives.
    pub fn drop_first_batch(&mut self) -> bool {
        match self.ends.pop_front() {
            Some(end) => {
                let base = self.c2s.pos;
                self.c2s.remove(base, end);
                let shift = end - base;
                for e in self.ends.iter_mut() {
                    *e -= shift;
                }
                if self.ends.is_empty() && self.c2s.is_empty() {
                    // Only a complete batch was there.
                }
                true
            }
            None => {
                self.c2s.clear();
                self.discarding = true;
                false
            }
        }
    }

    /// Forgets everything owed by a lost server; returns how many batches the client still
    /// waits on (forwarded or not), each of which gets an error and a ReadyForQuery.
    pub fn abandon_server(&mut self) -> usize {
        let owed = self.pending + self.ends.len();
        self.pending = 0;
        self.ends.clear();
        self.c2s.clear();
        if self.open_batch || !self.cscan.at_boundary() {
            self.discarding = true;
        }
        self.open_batch = false;
        self.rewrite_cancel = None;
        owed
    }

    fn after_client_write(&mut self) {
        while let Some(&e) = self.ends.front() {
            if e <= self.c2s.pos || self.c2s.is_empty() {
                self.ends.pop_front();
                self.pending += 1;
            } else {
                break;
            }
        }
    }

    fn scan_server(&mut self, from: usize) -> Result<(), ProtocolError> {
        let mut rewrite: Option<(usize, usize)> = None;
        let want_rewrite = self.rewrite_cancel.is_some();
        let pending = &mut self.pending;
        let status = &mut self.status;
        let fatal = &mut self.server_fatal;
        let saw_error = &mut self.saw_error;
        let chunk = self.s2c.filled_from(from);
        self.sscan.scan(chunk, |ev| {
            match ev.tag {
                b'Z' => {
                    *pending = pending.saturating_sub(1);
                    if let Some(&[s]) = ev.body {
                        *status = s;
                    }
                }
                b'E' => {
                    *saw_error = true;
                    if let Some(body) = ev.body {
                        let f = protocol::parse_error_fields(body);
                        if f.severity == "FATAL" || f.severity == "PANIC" {
                            *fatal = true;
                        }
                        if want_rewrite && f.code == "57014" {
                            if let Some(s) = ev.start {
                                rewrite = Some((from + s, from + ev.end));
                            }
                        }
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        })?;
        if let (Some((s, e)), Some(msg)) = (rewrite, self.rewrite_cancel.take()) {
            let mut m = bytes::BytesMut::new();
            protocol::error_response(&mut m, protocol::Severity::Error, "57014", msg, None);
            self.s2c.splice(s, e, &m);
        }
        Ok(())
    }
}

/// Relays until something needs the session's attention.
pub async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    st: &mut RelayState,
) -> RelayEvent {
    poll_fn(|cx| poll_relay(cx, client, server, st)).await
}

fn poll_relay(
    cx: &mut Context<'_>,
    client: &mut TcpStream,
    server: &mut TcpStream,
    st: &mut RelayState,
) -> Poll<RelayEvent> {
    loop {
        let mut progressed = false;

        // client -> server
        if !st.c2s.is_empty() {
            match Pin::new(&mut *server).poll_write(cx, st.c2s.data()) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(RelayEvent::ServerGone(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    st.c2s.consume(n);
                    st.after_client_write();
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(RelayEvent::ServerGone(e)),
                Poll::Pending => {}
            }
        } else if !st.terminated && !st.client_eof {
            let from = st.c2s.end;
            let mut rb = ReadBuf::new(st.c2s.spare());
            match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        st.client_eof = true;
                        return Poll::Ready(RelayEvent::ClientGone);
                    }
                    st.c2s.end += n;
                    if let Err(e) = st.scan_client(from) {
                        return Poll::Ready(RelayEvent::ClientProtocol(e));
                    }
                    progressed = true;
                }
                Poll::Ready(Err(_)) => {
                    st.client_eof = true;
                    return Poll::Ready(RelayEvent::ClientGone);
                }
                Poll::Pending => {}
            }
        }

        // server -> client
        if !st.s2c.is_empty() {
            match Pin::new(&mut *client).poll_write(cx, st.s2c.data()) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    st.s2c.consume(n);
                    progressed = true;
                }
                Poll::Ready(_) => {
                    st.client_eof = true;
                    return Poll::Ready(RelayEvent::ClientGone);
                }
                Poll::Pending => {}
            }
        } else {
            let from = st.s2c.end;
            let mut rb = ReadBuf::new(st.s2c.spare());
            match Pin::new(&mut *server).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(RelayEvent::ServerGone(
                            io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                    st.s2c.end += n;
                    if let Err(e) = st.scan_server(from) {
                        return Poll::Ready(RelayEvent::ServerProtocol(e));
                    }
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(RelayEvent::ServerGone(e)),
                Poll::Pending => {}
            }
        }

        if st.is_idle() {
            return Poll::Ready(RelayEvent::Idle);
        }
        if st.terminated && st.c2s.is_empty() && st.pending == 0 && st.s2c.is_empty() {
            return Poll::Ready(RelayEvent::ClientGone);
        }
        if !progressed {
            return Poll::Pending;
        }
    }
}

/// Writes all of `bytes` to the client.
pub async fn write_client(client: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    tokio::io::AsyncWriteExt::write_all(client, bytes).await
}

/// Drains server output (discarding it) until every forwarded batch has its ReadyForQuery.
pub async fn drain_server(server: &mut TcpStream, st: &mut RelayState) -> io::Result<()> {
    st.s2c.clear();
    while st.pending > 0 || !st.sscan.at_boundary() {
        let from = st.s2c.end;
        let n = tokio::io::AsyncReadExt::read(server, st.s2c.spare()).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        st.s2c.end += n;
        st.scan_server(from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        st.s2c.clear();
    }
    Ok(())
}

/// Sends a simple query on an idle server connection and drains its result.
pub async fn run_internal(
    server: &mut TcpStream,
    st: &mut RelayState,
    sql: &str,
) -> io::Result<()> {
    let mut b = bytes::BytesMut::new();
    protocol::query(&mut b, sql);
    tokio::io::AsyncWriteExt::write_all(server, &b).await?;
    st.pending += 1;
    drain_server(server, st).await
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_read<T: AsyncRead + AsyncWrite>() {}
    is_read::<TcpStream>();
}
