//! Resending a batch whose server was already dead. A pooled connection can die between
//! the checkout check and the first write (the reactor had not yet seen the FIN). The
//! first batch on a fresh checkout goes out behind a marker, a Sync, and until the server
//! answers the marker the relay keeps the client's raw bytes and holds the server's bytes
//! unscanned. EOF, an error, or a message saying the backend was terminated before that
//! answer means the backend never read the batch, so the bytes go back into `c2s` and the
//! session sends them to another server instead of failing the batch. Once the marker is
//! answered, a failure is reported: the batch may have run (and committed) even when
//! nothing of its answer arrives, e.g. a backend killed with its output still buffered.

use super::{IgnoredSyncs, RelayEvent, RelayState, MAX_REPLAY, MAX_RETRIES};
use crate::protocol::{self, ProtocolError};
use crate::session::prepared::ServerStatements;
use std::collections::VecDeque;
use std::io;

/// Sync, sent ahead of the first batch on a fresh checkout.
const MARKER: &[u8] = &[b'S', 0, 0, 0, 4];

/// What the relay does with server bytes just read.
pub(in crate::session) enum Held {
    /// Not holding: scan them as usual.
    No,
    /// The first message is still incomplete: keep holding.
    Wait,
    /// The first message is a real answer: holding ended, the bytes were scanned.
    Released(Result<(), ProtocolError>),
    /// The first message says the backend was terminated before answering the marker.
    Stale,
}

/// Boxed in `RelayState`: kept out of the session's future, which every idle client pays for.
#[derive(Default)]
pub(super) struct Replay {
    /// The client's raw bytes since the fresh checkout; empty when not holding.
    bytes: Vec<u8>,
    /// Resends of the current batch after stale servers.
    retries: u8,
}

impl Replay {
    /// Memory worth giving back when the client goes idle.
    pub(super) fn is_large(&self) -> bool {
        self.bytes.capacity() > 1024
    }
}

impl RelayState {
    fn retries(&self) -> u8 {
        self.replay.as_ref().map_or(0, |r| r.retries)
    }

    fn reset_retries(&mut self) {
        if let Some(r) = self.replay.as_mut() {
            r.retries = 0;
        }
    }

    /// Puts a whole batch (one that answers with ReadyForQuery) ahead of all unsent client
    /// bytes, on a server with nothing in flight. False when that is not the case.
    pub(in crate::session) fn inject_front(&mut self, msg: &[u8]) -> bool {
        if self.pending > 0 || self.rw_stream > 0 || !self.s2c.is_empty() || !self.expect.is_empty()
        {
            return false;
        }
        let at = self.c2s.pos;
        self.c2s.splice(at, at, msg);
        for e in self.ends.iter_mut() {
            *e += msg.len();
        }
        self.ends.push_front(at + msg.len());
        // The injected bytes need no statement rewriting.
        self.rw_pos = self.rw_pos.max(at) + msg.len();
        true
    }

    /// Called when a batch starts on a freshly checked-out server: keeps what the client
    /// sent so far, if the state allows a clean resend.
    pub(in crate::session) fn begin_hold(&mut self) {
        self.clear_replay();
        // A session-parameter query spliced in front is the new server's, not the client's.
        let start = if self.params.stripping() {
            match self.ends.front() {
                Some(&e) => e,
                None => return,
            }
        } else {
            self.c2s.pos
        };
        let clean = self.status == b'I'
            && self.pending == 0
            && !self.discarding
            && self.s2c.is_empty()
            && self.sscan.at_boundary()
            && self.expect.is_empty()
            && self.rw_stream == 0
            && (!self.rewrite_on || self.rw_pos <= start)
            && !self.terminated
            && !self.client_eof;
        let len = self.c2s.end.saturating_sub(start);
        if !clean || self.retries() >= MAX_RETRIES || len == 0 || len > MAX_REPLAY {
            self.reset_retries();
            return;
        }
        let raw = self.c2s.slice(start, self.c2s.end);
        if !resendable(raw) {
            self.reset_retries();
            return;
        }
        self.replay
            .get_or_insert_with(Default::default)
            .bytes
            .extend_from_slice(raw);
        // The marker: a server that answers it has read it, and nothing of the batch yet
        // (a backend reads its messages in order and flushes ReadyForQuery before it reads
        // on). Without it, a backend killed after running the batch but before its output
        // left its buffer looks like one that never read it.
        if self.inject_front(MARKER) {
            self.params.injected();
        } else {
            self.clear_replay();
        }
    }

    /// Client bytes just read at `from..c2s.end` (after the scan) join the kept ones.
    pub(super) fn keep_raw(
        &mut self,
        from: usize,
        server: &mut ServerStatements,
    ) -> Result<(), ProtocolError> {
        if !self.holding() {
            return Ok(());
        }
        let end = self.c2s.end;
        if end > from {
            let kept = self.replay.as_ref().map_or(0, |r| r.bytes.len());
            if kept + (end - from) > MAX_REPLAY {
                return self.release_hold(server);
            }
            self.replay
                .get_or_insert_with(Default::default)
                .bytes
                .extend_from_slice(self.c2s.slice(from.max(self.c2s.pos), end));
        }
        Ok(())
    }

    /// Looks at server bytes read while holding.
    pub(super) fn on_held(&mut self, server: &mut ServerStatements) -> Held {
        if !self.holding() {
            return Held::No;
        }
        match first_reply_stale(self.s2c.data()) {
            None => Held::Wait,
            Some(true) => Held::Stale,
            Some(false) => Held::Released(self.release_hold(server)),
        }
    }

    /// Stops holding; held server bytes are scanned now.
    pub(super) fn release_hold(
        &mut self,
        server: &mut ServerStatements,
    ) -> Result<(), ProtocolError> {
        if !self.holding() {
            return Ok(());
        }
        self.reset_retries();
        self.clear_replay();
        if self.s2c.is_empty() {
            return Ok(());
        }
        let at = self.s2c.pos;
        self.scan_server(at, server)
    }

    /// The server failed. Before its first real byte, the batch is put back (`Stale`).
    pub(super) fn server_gone(&mut self, e: io::Error) -> RelayEvent {
        if !self.holding() {
            return RelayEvent::ServerGone(e);
        }
        // Held bytes were never scanned nor forwarded: a FATAL, a notice, or a fragment.
        self.s2c.clear();
        if self.restore() {
            RelayEvent::Stale
        } else {
            self.clear_replay();
            RelayEvent::ServerGone(e)
        }
    }

    /// Kept client bytes mean the first reply is awaited (they are never empty then).
    pub(super) fn holding(&self) -> bool {
        self.replay.as_ref().is_some_and(|r| !r.bytes.is_empty())
    }

    pub(super) fn clear_replay(&mut self) {
        if let Some(r) = self.replay.as_mut() {
            r.bytes.clear();
        }
    }

    /// Puts the kept raw bytes back as unsent and forgets what the dead server was owed.
    fn restore(&mut self) -> bool {
        let Some(mut kept) = self.replay.take() else {
            return false;
        };
        let ends = batch_ends(&kept.bytes);
        let ok = !self.terminated && !self.client_eof && !kept.bytes.is_empty();
        let found = ends.filter(|_| ok);
        if found.is_some() {
            self.c2s.clear();
            self.c2s.splice(0, 0, &kept.bytes);
            kept.retries += 1;
        }
        kept.bytes.clear();
        self.replay = Some(kept);
        let Some((ends, open)) = found else {
            return false;
        };
        self.ends = ends;
        self.open_batch = open;
        self.pending = 0;
        // Rewriting starts over for the next server (statement names, injected Parses).
        self.rw_pos = 0;
        self.rw_stream = 0;
        self.copy_rw = IgnoredSyncs::default();
        self.expect.unwind(&mut self.stmts);
        self.params.abandon();
        self.saw_error = false;
        self.server_fatal = false;
        self.fatal_to_client = false;
        self.rewrite_cancel = None;
        self.status = b'I';
        true
    }
}

/// Batch ends and the open-batch flag of raw client bytes, as `scan_client` computes them
/// (only complete messages count); None when they hold anything but ordinary batch
/// messages, which would make a resend unsafe.
fn batch_ends(raw: &[u8]) -> Option<(VecDeque<usize>, bool)> {
    let mut ends = VecDeque::new();
    let open = walk_batch(raw, |end| ends.push_back(end))?;
    Some((ends, open))
}

/// `batch_ends` without collecting the ends (checked before every batch: no allocation).
fn resendable(raw: &[u8]) -> bool {
    walk_batch(raw, |_| {}).is_some()
}

/// Calls `end` at each batch end; the open-batch flag, or None as for `batch_ends`.
fn walk_batch(raw: &[u8], mut end_at: impl FnMut(usize)) -> Option<bool> {
    let (mut at, mut open) = (0usize, false);
    // Each step advances by at least five bytes.
    while raw.len() - at >= 5 {
        let len = i32::from_be_bytes([raw[at + 1], raw[at + 2], raw[at + 3], raw[at + 4]]);
        if len < 4 {
            return None;
        }
        let end = at + 1 + len as usize;
        if end > raw.len() {
            break;
        }
        match raw[at] {
            b'Q' | b'S' | b'F' => {
                end_at(end);
                open = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => open = true,
            b'H' => {}
            _ => return None,
        }
        at = end;
    }
    Some(open)
}

/// Whether the first message of a fresh server's answer says the backend was terminated
/// (admin, crash, shutdown, idle-session timeout) before it answered the marker, so it
/// never read the batch. None while the message is incomplete.
fn first_reply_stale(d: &[u8]) -> Option<bool> {
    let &tag = d.first()?;
    if tag != b'E' && tag != b'N' {
        return Some(false);
    }
    let h = d.get(1..5)?;
    let len = i32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if !(4..=16 * 1024).contains(&len) {
        return Some(false);
    }
    let f = protocol::parse_error_fields(d.get(5..1 + len as usize)?);
    let terminated = matches!(f.code.as_str(), "57P01" | "57P02" | "57P03" | "57P05");
    // PostgreSQL's immediate shutdown says it with a WARNING notice, then closes.
    Some(terminated && (tag == b'N' || f.severity == "FATAL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn ends_follow_complete_messages_only() {
        let mut raw = msg(b'Q', b"select 1\0");
        raw.extend(msg(b'P', b"\0select 2\0\0\0"));
        raw.extend(msg(b'S', b""));
        raw.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        raw.extend(&msg(b'E', b"\0\0\0\0\0")[..3]);
        let (ends, open) = batch_ends(&raw).unwrap();
        assert_eq!(ends.len(), 2);
        assert!(open);
        assert!(batch_ends(&msg(b'd', b"x")).is_none());
        assert!(batch_ends(&[b'Q', 0, 0, 0, 1]).is_none());
        assert!(resendable(&raw));
        assert!(!resendable(&msg(b'd', b"x")));
    }

    #[test]
    fn only_termination_codes_are_stale() {
        let e = |sev: &str, code: &str| {
            let body = format!("S{sev}\0V{sev}\0C{code}\0Mx\0\0");
            msg(b'E', body.as_bytes())
        };
        assert_eq!(first_reply_stale(&e("FATAL", "57P01")), Some(true));
        assert_eq!(first_reply_stale(&e("FATAL", "57P05")), Some(true));
        assert_eq!(first_reply_stale(&e("ERROR", "57P01")), Some(false));
        assert_eq!(first_reply_stale(&e("FATAL", "28000")), Some(false));
        assert_eq!(first_reply_stale(&e("FATAL", "57P01")[..7]), None);
        assert_eq!(first_reply_stale(b"T"), Some(false));
        assert_eq!(first_reply_stale(b""), None);
    }
}
