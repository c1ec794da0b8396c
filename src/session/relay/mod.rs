//! The relay: bytes flow client→server and server→client in bulk from two pooled buffers,
//! both sockets polled at once (so neither side can deadlock the other), while a header
//! scanner tracks the few protocol facts the proxy acts on: where batches end, each
//! ReadyForQuery and its transaction status, Terminate, fatal server errors.

use super::bufpool::Buf;
use super::copyin::{IgnoredSyncs, UnstartedCopy};
use super::params::Tracker;
use super::prepared::{ClientStatements, Expectations};
use crate::protocol::{FrameScanner, ProtocolError};
use std::collections::VecDeque;
use std::io;

mod client;
mod poll;
mod replay;
mod server;
pub use poll::{drain_server, relay, run_internal};

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
}
