//! The relay: bytes flow client→server and server→client in bulk from two pooled buffers,
//! both sockets polled at once (so neither side can deadlock the other), while a header
//! scanner tracks the few protocol facts the proxy acts on: where batches end, each
//! ReadyForQuery and its transaction status, Terminate, fatal server errors.

use super::bufpool::Buf;
use super::copyin::{IgnoredSyncs, UnstartedCopy};
use super::params::Tracker;
use super::prepared::{self, ClientStatements, Expectations, ServerStatements, Verdict};
use crate::pool::ServerConn;
use crate::protocol::{self, FrameScanner, ProtocolError};
use crate::tls::ClientStream;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod replay;
use replay::Held;

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
    /// A freshly checked-out server failed before its first byte (EOF, or a FATAL saying it
    /// was terminated): nothing ran there. The client's bytes are back in `c2s`, unsent.
    Stale,
    /// The admin console's `KILL db` ended the session mid-batch (set by the session, never
    /// by the relay itself).
    Killed,
}

/// Client bytes kept for a resend on another server, at most.
const MAX_REPLAY: usize = 16 * 1024;
/// Resends of one batch after stale servers before its failure is reported. After an
/// upstream restart every idle connection of a pool may be dead; each try discards one.
const MAX_RETRIES: u8 = 8;

/// Protocol state of one client's stream, kept for the session's lifetime.
pub struct RelayState {
    pub c2s: Buf,
    pub s2c: Buf,
    pub cscan: FrameScanner,
    pub sscan: FrameScanner,
    /// Offsets in `c2s` just past each unsent batch-ending message (Query, Sync, FunctionCall).
    pub(super) ends: VecDeque<usize>,
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
    /// That FATAL was passed on to the client (not removed as a pooled server's own).
    pub fatal_to_client: bool,
    /// Replace the next 57014 ErrorResponse with the proxy's own timeout message.
    pub rewrite_cancel: Option<&'static str>,
    /// Client bytes are being dropped until the current batch ends (after a refusal).
    pub discarding: bool,
    /// Set by the scan when a discarded batch has ended: answer it with ReadyForQuery.
    pub discard_done: bool,
    /// The bytes being discarded get no answer at all (see [`UnstartedCopy`]).
    pub(super) discard_silent: bool,
    /// The end of a COPY that never started may follow.
    pub(super) unstarted_copy: UnstartedCopy,
    /// The Terminate message was cut in two by a read; part of it may be upstream.
    pub terminate_split: bool,
    /// The server sent an ErrorResponse during the current batch.
    pub saw_error: bool,
    /// This batch's bytes and messages for the pool's `SHOW STATS`.
    pub counts: crate::pool::stats::BatchCounts,
    /// Syncs ignored by a server in copy-in mode, seen by the scan and by the rewrite.
    /// (Its `server_in_copy` also records the server's copy-in mode.)
    pub(super) copy_scan: IgnoredSyncs,
    copy_rw: IgnoredSyncs,
    /// A cancel or timeout (57014) ended an extended-protocol COPY FROM STDIN: whether the
    /// server had read the Syncs sent after its Execute (ignored in copy-in mode) or reads
    /// them now (each answered) depends on timing, so the count of owed ReadyForQuery may
    /// be off by those. The server connection is never reused after that.
    pub copy_syncs_unknown: bool,
    /// Transaction pooling: rename named statements and prepare them where needed.
    pub rewrite_on: bool,
    /// Most statements kept prepared per server connection.
    pub stmt_cap: usize,
    /// Client bytes before this offset are rewritten and may be forwarded.
    pub(super) rw_pos: usize,
    /// Bytes left of a message being passed through unexamined.
    pub(super) rw_stream: usize,
    pub stmts: ClientStatements,
    pub expect: Expectations,
    scratch: Vec<u8>,
    /// Session parameters: tracked values, responses of injected queries to remove.
    pub params: Tracker,
    /// Until the first server byte after a fresh checkout: the client's raw bytes since,
    /// for a resend if that server turns out dead, while server bytes are held unscanned.
    replay: Option<Box<replay::Replay>>,
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
            sscan: FrameScanner::new(b"ZES"),
            ends: VecDeque::new(),
            pending: 0,
            open_batch: false,
            status: b'I',
            terminated: false,
            client_eof: false,
            server_fatal: false,
            fatal_to_client: false,
            rewrite_cancel: None,
            discarding: false,
            discard_done: false,
            discard_silent: false,
            unstarted_copy: UnstartedCopy::default(),
            terminate_split: false,
            saw_error: false,
            counts: Default::default(),
            copy_scan: IgnoredSyncs::default(),
            copy_syncs_unknown: false,
            copy_rw: IgnoredSyncs::default(),
            rewrite_on: false,
            stmt_cap: 0,
            rw_pos: 0,
            rw_stream: 0,
            stmts: ClientStatements::default(),
            expect: Expectations::default(),
            scratch: Vec::new(),
            params: Tracker::default(),
            replay: None,
        }
    }

    /// Enables statement renaming (transaction pooling).
    pub fn enable_rewrite(&mut self, client_id: u64, cap: usize) {
        // On even without renaming: unnamed statements must follow their client.
        self.rewrite_on = true;
        self.stmt_cap = cap;
        self.stmts = ClientStatements::new(client_id);
    }

    /// End of what may be written upstream now.
    fn c2s_limit(&self) -> usize {
        if self.rewrite_on {
            self.rw_pos.max(self.c2s.pos)
        } else {
            self.c2s.end
        }
    }

    /// End of what may be written to the client now: a ParseComplete or CloseComplete that
    /// may still have to be removed is held back until it is complete.
    fn s2c_limit(&self) -> usize {
        if self.holding() {
            return self.s2c.pos;
        }
        if self.params.stripping() {
            // Everything up to the injected query's ReadyForQuery is removed.
            return self.s2c.end - self.sscan.partial_len().min(self.s2c.len());
        }
        if self.rewrite_on
            && self
                .sscan
                .current_tag()
                .is_some_and(|t| self.expect.holds(t) || t == b'S' || t == b'Z')
        {
            self.s2c.end - self.sscan.partial_len().min(self.s2c.len())
        } else {
            self.s2c.end
        }
    }

    /// Rewrites complete client messages up to the end of the buffer for `server`.
    fn advance_rewrite(&mut self, server: &mut ServerStatements) {
        if !self.rewrite_on {
            return;
        }
        self.rw_pos = self.rw_pos.clamp(self.c2s.pos, self.c2s.end);
        loop {
            let end = self.c2s.end;
            if self.rw_stream > 0 {
                let take = self.rw_stream.min(end - self.rw_pos);
                let last = take == self.rw_stream;
                let bytes = self.c2s.slice(self.rw_pos, self.rw_pos + take);
                self.stmts.watch_tail(bytes, last, server);
                self.rw_pos += take;
                self.rw_stream -= take;
                if self.rw_stream > 0 {
                    return;
                }
                continue;
            }
            if end - self.rw_pos < 5 {
                // A header cut by the end of the buffer: make sure the rest can be read.
                self.c2s.grow_to(self.rw_pos + 5);
                return;
            }
            let h = self.c2s.slice(self.rw_pos, self.rw_pos + 5);
            let tag = h[0];
            let total = 1 + i32::from_be_bytes([h[1], h[2], h[3], h[4]]).max(4) as usize;
            // Headers are read again only for messages held incomplete, never for these.
            if matches!(tag, b'S' | b'c' | b'f') {
                let ignored = self.copy_rw.on_message(tag);
                self.expect.forget_syncs(ignored);
            } else {
                self.copy_rw.on_message(tag);
            }
            let need = match tag {
                b'P' | b'B' | b'D' | b'C' | b'S' => total,
                b'Q' => total.min(5 + prepared::QUERY_HOLD),
                b'F' => 5,
                _ => {
                    self.rw_stream = total;
                    continue;
                }
            };
            if end - self.rw_pos < need {
                // Hold the message until it is complete.
                self.c2s.grow_to(self.rw_pos + need);
                return;
            }
            let at = self.rw_pos;
            self.scratch.clear();
            let msg = self.c2s.slice(at, at + need);
            let replaced = prepared::rewrite(
                msg,
                &mut self.stmts,
                server,
                &mut self.expect,
                self.stmt_cap,
                &mut self.scratch,
            );
            if !replaced && matches!(tag, b'Q' | b'F') {
                self.rw_stream = total;
                continue;
            }
            if replaced {
                let new_len = self.scratch.len();
                let scratch = std::mem::take(&mut self.scratch);
                self.c2s.splice(at, at + total, &scratch);
                self.scratch = scratch;
                for e in self.ends.iter_mut() {
                    if *e > at {
                        *e = *e + new_len - total;
                    }
                }
                self.rw_pos = at + new_len;
            } else {
                self.rw_pos = at + total;
            }
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
        if self.replay.as_ref().is_some_and(|r| r.is_large()) {
            self.replay = None;
        }
    }

    /// Scans client bytes just read at absolute offsets `from..c2s.end`.
    pub fn scan_client(&mut self, from: usize) -> Result<(), ProtocolError> {
        let mut cut_terminate: Option<usize> = None;
        let mut discard_to: Option<usize> = None;
        let mut split = false;
        let mut discarding = self.discarding;
        let mut silent = self.discard_silent;
        let unsent_from = self.c2s.pos;
        let ends = &mut self.ends;
        let open_batch = &mut self.open_batch;
        let params = &mut self.params;
        let pending = &mut self.pending;
        let copy = &mut self.copy_scan;
        let counts = &mut self.counts;
        let unstarted = &mut self.unstarted_copy;
        let chunk = self.c2s.filled_from(from);
        counts.received += chunk.len() as u64;
        let mut flow = |tag: u8, start: Option<usize>, end: usize, len: usize| {
            let abs_end = from + end;
            // None for a message whose start was forwarded already (or cut from the buffer).
            let abs_start = abs_end.checked_sub(5 + len);
            if unstarted.ends_copy(tag)
                && !discarding
                && abs_start == Some(unsent_from)
                && ends.is_empty()
                && *pending == 0
                && !*open_batch
            {
                // Dropped with what follows up to its Sync; the COPY's answer went out.
                discarding = true;
                silent = true;
                copy.on_message(tag);
                return ControlFlow::Continue(());
            }
            match tag {
                b'P' => counts.client_parses += 1,
                b'B' => counts.binds += 1,
                _ => {}
            }
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
            let ignored = copy.on_message(tag);
            if ignored > 0 {
                // The end of an extended-protocol COPY FROM STDIN: its batch goes on to the
                // next Sync. The ignored Syncs are the newest batch ends: unsent ones stop
                // ending a batch, sent ones are owed no ReadyForQuery.
                for _ in 0..ignored {
                    if ends.pop_back().is_none() {
                        *pending = pending.saturating_sub(1);
                    }
                }
                *open_batch = true;
            }
            ControlFlow::Continue(())
        };
        self.cscan.scan(chunk, |ev| {
            if matches!(ev.tag, b'Q' | b'P' | b'B' | b'C') {
                let whole = ev.start.map(|s| &chunk[s..ev.end]);
                params.on_client_msg(ev.tag, ev.body, whole);
            }
            flow(ev.tag, ev.start, ev.end, ev.len)
        })?;
        if let Some(at) = cut_terminate {
            // Nothing after Terminate matters; never forward it (the server would close).
            self.c2s.end = at.max(self.c2s.pos);
            self.terminated = true;
            self.terminate_split = split;
        }
        if discarding {
            let drop_to = discard_to.unwrap_or(self.c2s.end);
            let base = self.c2s.pos;
            self.c2s.remove(base, drop_to);
            let shift = drop_to - base;
            for e in self.ends.iter_mut() {
                *e -= shift;
            }
            self.discarding = discard_to.is_none();
            self.discard_silent = silent && self.discarding;
            if discard_to.is_some() {
                self.discard_done = !silent;
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
                true
            }
            None => {
                self.c2s.clear();
                self.discarding = true;
                self.discard_silent = false;
                false
            }
        }
    }

    /// The proxy refused the client's first batch: when it was the last one, its tail is
    /// the stream's.
    pub(super) fn after_refusal(&mut self) {
        if self.ends.is_empty() && !self.open_batch && self.cscan.at_boundary() {
            self.unstarted_copy.arm(&self.copy_scan);
        }
    }

    /// Forgets everything owed by a lost server; returns how many batches the client still
    /// waits on (forwarded or not), each of which gets an error and a ReadyForQuery.
    pub fn abandon_server(&mut self) -> usize {
        // The client waits on its own batches only, not on injected parameter queries.
        let mut owed = (self.pending + self.ends.len()).saturating_sub(self.params.injected_owed());
        // An extended-protocol COPY FROM STDIN whose data is still coming: the Syncs since
        // its Execute are not answered. As from a server that failed in copy-in mode, the
        // client gets its error now and ReadyForQuery at the Sync after its CopyDone or
        // CopyFail (answering now would answer that Sync's batch twice).
        let copy_syncs = self.copy_scan.syncs_of_open_copy();
        owed = owed.saturating_sub(copy_syncs);
        if copy_syncs == 0 && !self.open_batch && self.cscan.at_boundary() {
            // Every batch, sent or not, is answered now: the stream's tail is the last's.
            self.unstarted_copy.arm(&self.copy_scan);
        }
        self.pending = 0;
        self.ends.clear();
        self.c2s.clear();
        let unanswered = self.discarding && self.discard_silent;
        if !unanswered && (self.open_batch || !self.cscan.at_boundary() || copy_syncs > 0) {
            self.discarding = true;
            self.discard_silent = false;
        }
        self.open_batch = false;
        self.rewrite_cancel = None;
        self.rw_pos = 0;
        self.rw_stream = 0;
        self.copy_scan = IgnoredSyncs::default();
        self.copy_rw = IgnoredSyncs::default();
        self.copy_syncs_unknown = false;
        self.expect.clear();
        self.stmts.server_lost();
        self.params.abandon();
        self.replay = None;
        owed
    }

    fn after_client_write(&mut self) {
        if self.c2s.is_empty() {
            self.rw_pos = 0;
        }
        while let Some(&e) = self.ends.front() {
            if e <= self.c2s.pos || self.c2s.is_empty() {
                self.ends.pop_front();
                self.pending += 1;
            } else {
                break;
            }
        }
    }

    pub(super) fn scan_server(
        &mut self,
        from: usize,
        server: &mut ServerStatements,
    ) -> Result<(), ProtocolError> {
        let mut at = from;
        loop {
            let mut rewrite: Option<(usize, usize)> = None;
            let pooled = self.rewrite_on;
            let to_client = &mut self.fatal_to_client;
            let mut strip: Option<(usize, usize)> = None;
            // A ParameterStatus to tell the client with another value.
            let mut status_rw: Option<(usize, usize, bytes::BytesMut)> = None;
            let want_rewrite = self.rewrite_cancel.is_some();
            let pos = self.s2c.pos;
            let pending = &mut self.pending;
            let status = &mut self.status;
            let fatal = &mut self.server_fatal;
            let saw_error = &mut self.saw_error;
            let copy = &mut self.copy_scan;
            let copy_syncs_unknown = &mut self.copy_syncs_unknown;
            let expect = &mut self.expect;
            let stmts = &mut self.stmts;
            let params = &mut self.params;
            let server_parses = &mut self.counts.server_parses;
            let chunk = self.s2c.filled_from(at);
            let n = self.sscan.scan(chunk, |ev| {
                if params.stripping() {
                    // An answer to an injected query: never reaches the client.
                    let span = params.strip_message(&ev, at, pending, status, fatal);
                    if let Some((start, end)) = span.filter(|&(start, _)| start >= pos) {
                        strip = Some((start, end));
                        return ControlFlow::Break(());
                    }
                    return ControlFlow::Continue(());
                }
                match ev.tag {
                    b'S' => {
                        if let Some(body) = ev.body {
                            let name = body.split(|&b| b == 0).next().unwrap_or_default();
                            if let Some(v) = params.on_status(body) {
                                let end = at + ev.end;
                                // None when the message began in bytes already forwarded and cut from the buffer.
                                let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                                if let Some(start) = start {
                                    let mut m = bytes::BytesMut::new();
                                    protocol::parameter_status(
                                        &mut m,
                                        &String::from_utf8_lossy(name),
                                        v,
                                    );
                                    status_rw = Some((start, end, m));
                                    return ControlFlow::Break(());
                                }
                            }
                        }
                    }
                    b'G' => copy.server_in_copy = true,
                    b'Z' => {
                        copy.server_in_copy = false;
                        *pending = pending.saturating_sub(1);
                        if let Some(&[s]) = ev.body {
                            *status = s;
                        }
                        expect.on_ready(*status, stmts);
                        let end = at + ev.end;
                        // None when the message began in bytes already forwarded and cut from the buffer.
                        let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                        if *saw_error || *status == b'E' {
                            // The RESET may have been rolled back: the read-back tells.
                            params.before_ready_skip();
                        } else if let Some(start) = start {
                            let mut m = bytes::BytesMut::new();
                            params.before_ready(&mut m);
                            if !m.is_empty() {
                                status_rw = Some((start, start, m));
                                return ControlFlow::Break(());
                            }
                        }
                    }
                    b'1' | b'3' | b'C' => {
                        if ev.tag == b'1' {
                            *server_parses += 1;
                        }
                        if expect.on_complete(ev.tag, stmts) == Verdict::Strip {
                            let end = at + ev.end;
                            // None when the message began in bytes already forwarded and cut from the buffer.
                            let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                            if let Some(start) = start {
                                strip = Some((start, end));
                                return ControlFlow::Break(());
                            }
                        }
                    }
                    b'E' => {
                        *saw_error = true;
                        let open_copy_syncs = copy.syncs_of_open_copy();
                        copy.server_in_copy = false;
                        expect.on_error(server, stmts);
                        if let Some(body) = ev.body {
                            let f = protocol::parse_error_fields(body);
                            if open_copy_syncs > 0 && f.code == "57014" {
                                *copy_syncs_unknown = true;
                            }
                            if f.severity == "FATAL" || f.severity == "PANIC" {
                                *fatal = true;
                                *to_client = true;
                                if pooled && *pending == 0 && *status == b'I' {
                                    *to_client = false;
                                    // After the last owed ReadyForQuery: the pooled server
                                    // is going away on its own (a shutdown); the client
                                    // asked nothing and must not get an unasked answer.
                                    let end = at + ev.end;
                                    // None when the message began in bytes already forwarded and cut from the buffer.
                                    let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                                    if let Some(start) = start {
                                        strip = Some((start, end));
                                        return ControlFlow::Break(());
                                    }
                                }
                            }
                            if want_rewrite && f.code == "57014" {
                                if let Some(s) = ev.start {
                                    rewrite = Some((at + s, at + ev.end));
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
            if let Some((s, e, m)) = status_rw {
                let next = at + n;
                self.s2c.splice(s, e, &m);
                at = next - (e - s) + m.len();
                if at >= self.s2c.end {
                    return Ok(());
                }
                continue;
            }
            match strip {
                Some((s, e)) => {
                    let next = at + n;
                    self.s2c.remove(s, e);
                    at = next - (e - s);
                    if at >= self.s2c.end {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
    }
}

/// Relays until something needs the session's attention.
pub async fn relay(
    client: &mut ClientStream,
    server: &mut ServerConn,
    st: &mut RelayState,
) -> RelayEvent {
    let ev = poll_fn(|cx| poll_relay(cx, client, server, st)).await;
    if matches!(ev, RelayEvent::Stale) {
        return ev;
    }
    // Server bytes held while waiting for the first reply are scanned before anyone
    // else (a drain, a release) reads this stream.
    match st.release_hold(&mut server.prepared) {
        Ok(()) => ev,
        Err(e) => RelayEvent::ServerProtocol(e),
    }
}

fn poll_relay(
    cx: &mut Context<'_>,
    client: &mut ClientStream,
    server: &mut ServerConn,
    st: &mut RelayState,
) -> Poll<RelayEvent> {
    loop {
        let mut progressed = false;

        // client -> server
        st.advance_rewrite(&mut server.prepared);
        let limit = st.c2s_limit();
        if limit > st.c2s.pos {
            match Pin::new(&mut server.stream).poll_write(cx, st.c2s.data_to(limit)) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(st.server_gone(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    st.c2s.consume(n);
                    st.after_client_write();
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.server_gone(e)),
                Poll::Pending => {}
            }
        }
        if !st.terminated && !st.client_eof && st.c2s.has_spare() {
            let _ = st.c2s.spare();
            let from = st.c2s.end;
            let mut rb = ReadBuf::new(st.c2s.spare());
            match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        st.client_eof = true;
                        return Poll::Ready(RelayEvent::ClientGone);
                    }
                    let from = if st.c2s.pos == 0 && st.c2s.end == 0 {
                        0
                    } else {
                        from
                    };
                    st.c2s.end = from + n;
                    if let Err(e) = st.scan_client(from) {
                        return Poll::Ready(RelayEvent::ClientProtocol(e));
                    }
                    if let Err(e) = st.keep_raw(from, &mut server.prepared) {
                        return Poll::Ready(RelayEvent::ServerProtocol(e));
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
        let limit = st.s2c_limit();
        if limit > st.s2c.pos {
            match Pin::new(&mut *client).poll_write(cx, st.s2c.data_to(limit)) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    st.s2c.consume(n);
                    st.counts.sent += n as u64;
                    progressed = true;
                }
                Poll::Ready(_) => {
                    st.client_eof = true;
                    return Poll::Ready(RelayEvent::ClientGone);
                }
                Poll::Pending => {}
            }
        }
        if !st.s2c.has_spare() && st.s2c_limit() <= st.s2c.pos {
            // A held message cut by the end of a full buffer: room for the rest of it.
            let end = st.s2c.end;
            st.s2c.grow_to(end + 16);
        }
        if st.s2c.has_spare() && st.s2c_limit() <= st.s2c.pos {
            let _ = st.s2c.spare();
            let from = st.s2c.end;
            let mut rb = ReadBuf::new(st.s2c.spare());
            match Pin::new(&mut server.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(st.server_gone(io::ErrorKind::UnexpectedEof.into()));
                    }
                    let from = if st.s2c.pos == 0 && st.s2c.end == 0 {
                        0
                    } else {
                        from
                    };
                    st.s2c.end = from + n;
                    let scanned = match st.on_held(&mut server.prepared) {
                        Held::No => st.scan_server(from, &mut server.prepared),
                        Held::Wait => Ok(()),
                        Held::Released(r) => r,
                        Held::Stale => {
                            let e = io::ErrorKind::ConnectionAborted.into();
                            return Poll::Ready(st.server_gone(e));
                        }
                    };
                    if let Err(e) = scanned {
                        return Poll::Ready(RelayEvent::ServerProtocol(e));
                    }
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.server_gone(e)),
                Poll::Pending => {}
            }
        }

        // TLS may accept bytes without sending them; flush both sides every round so
        // nothing written waits for a next write that may never come. Plain TCP: no-op.
        if let Poll::Ready(Err(e)) = Pin::new(&mut server.stream).poll_flush(cx) {
            return Poll::Ready(st.server_gone(e));
        }
        let client_flushed = match Pin::new(&mut *client).poll_flush(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                st.client_eof = true;
                return Poll::Ready(RelayEvent::ClientGone);
            }
            Poll::Pending => false,
        };
        if st.is_idle() && client_flushed {
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

/// Drains server output (discarding it) until every forwarded batch has its ReadyForQuery.
pub async fn drain_server(server: &mut ServerConn, st: &mut RelayState) -> io::Result<()> {
    st.s2c.clear();
    while st.pending > 0 || !st.sscan.at_boundary() {
        let n = tokio::io::AsyncReadExt::read(&mut server.stream, st.s2c.spare()).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        st.s2c.end = n;
        st.scan_server(0, &mut server.prepared)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        st.s2c.clear();
    }
    st.expect.clear();
    Ok(())
}

/// Sends a simple query on an idle server connection and drains its result.
pub async fn run_internal(
    server: &mut ServerConn,
    st: &mut RelayState,
    sql: &str,
) -> io::Result<()> {
    let mut b = bytes::BytesMut::new();
    protocol::query(&mut b, sql);
    tokio::io::AsyncWriteExt::write_all(&mut server.stream, &b).await?;
    tokio::io::AsyncWriteExt::flush(&mut server.stream).await?;
    st.pending += 1;
    drain_server(server, st).await
}
