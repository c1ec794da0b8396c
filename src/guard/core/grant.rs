//! The grant a query holds while it runs.

use std::sync::Arc;
use std::time::Duration;

/// A slot handed to a query. Times are kept as nanoseconds: a permit lives in every
/// session's future, several times over, and a `Duration` is twice the size.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub pool: Arc<str>,
    pub identity: Arc<str>,
    pub(super) waited_ns: u64,
    /// Running time of the completed query, reported before the slot is released; 0 when it
    /// did not complete (client gone, server lost): no sample for the limiter.
    pub(super) running_ns: u64,
    /// This query is the half-open circuit probe.
    pub probe: bool,
    /// Holds a concurrency slot.
    pub slot: bool,
    /// Holds a server-connection lease of `pool`.
    pub lease: bool,
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Grant {
    pub(crate) fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns)
    }

    pub(crate) fn running(&self) -> Option<Duration> {
        (self.running_ns > 0).then(|| Duration::from_nanos(self.running_ns))
    }

    pub(crate) fn set_running(&mut self, d: Duration) {
        self.running_ns = nanos(d).max(1);
    }
}
