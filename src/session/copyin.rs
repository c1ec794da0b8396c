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
