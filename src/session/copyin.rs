//! COPY FROM STDIN over the extended protocol: drivers send Bind, Execute and a Sync before
//! they know the statement is a COPY, then the data, CopyDone (or CopyFail) and another
//! Sync. A server in copy-in mode ignores Sync, so only the last one is answered with
//! ReadyForQuery; the proxy's count of owed answers must not wait for the others.
//!
//! A client that leaves mid-COPY: its backend waits for data and ignores a cancel, holding
//! its transaction and locks, so the proxy ends the COPY for it with CopyFail.

use super::relay::RelayState;

/// Watches a client's messages in stream order for Syncs the server will ignore.
#[derive(Default)]
pub struct IgnoredSyncs {
    /// Last message that was not Sync, Flush or COPY data.
    last: u8,
    /// Syncs since `last`.
    syncs: usize,
    /// The server is in copy-in mode (CopyInResponse seen, no error or ReadyForQuery
    /// since); kept up to date by the relay's server scan.
    pub(super) server_in_copy: bool,
}

impl IgnoredSyncs {
    /// The COPY under way was started by an Execute (not a simple Query).
    fn extended(&self) -> bool {
        self.last == b'E'
    }

    /// Syncs sent since the Execute of an extended-protocol COPY FROM STDIN whose data is
    /// still to come: the server ignores them, the COPY is answered at the Sync after its
    /// CopyDone or CopyFail. 0 when no such COPY is under way.
    pub(super) fn syncs_of_open_copy(&self) -> usize {
        if self.server_in_copy && self.extended() {
            self.syncs
        } else {
            0
        }
    }

    /// The client's last messages were `Execute, Sync` and the server never entered
    /// copy-in mode for them.
    fn ended_in_execute_sync(&self) -> bool {
        self.extended() && self.syncs > 0 && !self.server_in_copy
    }

    /// Feeds one message tag; returns how many of the Syncs before it turned out to be
    /// ignored (non-zero only at the CopyDone/CopyFail of a COPY started by an Execute).
    pub fn on_message(&mut self, tag: u8) -> usize {
        match tag {
            b'S' => {
                self.syncs += 1;
                0
            }
            b'c' | b'f' if self.last == b'E' => {
                self.last = tag;
                std::mem::take(&mut self.syncs)
            }
            b'H' | b'd' | b'c' | b'f' => 0,
            _ => {
                self.last = tag;
                self.syncs = 0;
                0
            }
        }
    }
}

/// A batch ending in `Execute, Sync` that the proxy answered itself (a refusal, or an
/// error for a lost server) before any CopyInResponse. When that Execute was a COPY FROM
/// STDIN, tokio-postgres (which sends its data only after CopyInResponse) then ends the
/// COPY it never started with `CopyFail, Sync` and expects no answer to that Sync: it
/// counts on the server ignoring it as in copy-in mode. PostgreSQL would answer it with
/// ReadyForQuery, and tokio-postgres would take that as the answer to its next request
/// (rust-postgres issue 789); PostgreSQL rarely fails a COPY at that point, the proxy's
/// shedding often does. So the proxy drops that CopyFail (or CopyDone) and everything up
/// to and including the next Sync, unanswered, when they are the very next messages.
#[derive(Default)]
pub struct UnstartedCopy {
    armed: bool,
}

impl UnstartedCopy {
    /// The proxy has just answered the client's last batch itself.
    pub(super) fn arm(&mut self, copy: &IgnoredSyncs) {
        self.armed = copy.ended_in_execute_sync();
    }

    /// The next client message: true when it is the CopyFail or CopyDone to drop. Any
    /// message disarms.
    pub(super) fn ends_copy(&mut self, tag: u8) -> bool {
        std::mem::take(&mut self.armed) && matches!(tag, b'c' | b'f')
    }
}

/// CopyFail with the reason the backend will log.
pub(super) const COPY_FAIL: &[u8] = b"f\0\0\0\x2epgsluice: client disconnected during COPY\0";

/// The client is gone while its server is in copy-in mode: true when [`COPY_FAIL`] must be
/// sent; the bookkeeping is updated as if the client had sent it. The server then answers
/// with an ErrorResponse (the transaction rolls back) and, after a COPY started by a simple
/// Query, ReadyForQuery; after an extended-protocol one it waits for a Sync, so
/// `open_batch` is set for the caller to send one.
pub(super) fn abort_copy_in(st: &mut RelayState) -> bool {
    if !st.copy_scan.server_in_copy {
        return false;
    }
    st.copy_scan.server_in_copy = false;
    let extended = st.copy_scan.extended();
    // Syncs sent since the COPY's Execute were ignored by the server: none is answered.
    let ignored = st.copy_scan.on_message(b'f');
    st.pending = st.pending.saturating_sub(ignored);
    st.expect.forget_syncs(ignored);
    if extended {
        st.open_batch = true;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::IgnoredSyncs;

    fn feed(tags: &[u8]) -> Vec<usize> {
        let mut t = IgnoredSyncs::default();
        tags.iter().map(|&tag| t.on_message(tag)).collect()
    }

    #[test]
    fn extended_copy_in_ignores_the_sync_after_execute() {
        // Bind, Execute, Sync, CopyData x2, CopyDone, Sync: one Sync ignored.
        assert_eq!(feed(b"BESddcS"), [0, 0, 0, 0, 0, 1, 0]);
        // CopyFail, and a Flush instead of data.
        assert_eq!(feed(b"PBESHfS"), [0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn copy_fail_is_well_formed() {
        let m = super::COPY_FAIL;
        assert_eq!(
            i32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize,
            m.len() - 1
        );
        assert_eq!(m.last(), Some(&0));
    }

    #[test]
    fn simple_query_copy_and_plain_batches_ignore_nothing() {
        assert_eq!(feed(b"QddcQ"), [0; 5]);
        assert_eq!(feed(b"PBESBESQ"), [0; 8]);
        assert_eq!(feed(b"BESQdc"), [0; 6]);
    }
}
