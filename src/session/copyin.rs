//! COPY FROM STDIN over the extended protocol: drivers send Bind, Execute and a Sync before
//! they know the statement is a COPY, then the data, CopyDone (or CopyFail) and another
//! Sync. A server in copy-in mode ignores Sync, so only the last one is answered with
//! ReadyForQuery; the proxy's count of owed answers must not wait for the others.

/// Watches a client's messages in stream order for Syncs the server will ignore.
#[derive(Default)]
pub struct IgnoredSyncs {
    /// Last message that was not Sync, Flush or COPY data.
    last: u8,
    /// Syncs since `last`.
    syncs: usize,
}

impl IgnoredSyncs {
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
    fn simple_query_copy_and_plain_batches_ignore_nothing() {
        assert_eq!(feed(b"QddcQ"), [0; 5]);
        assert_eq!(feed(b"PBESBESQ"), [0; 8]);
        assert_eq!(feed(b"BESQdc"), [0; 6]);
    }
}
