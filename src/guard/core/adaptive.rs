//! Where the adaptive limiter meets the admission core: samples in on each release, the
//! limit out. A lower limit only stops new grants; running queries finish.

use std::time::Instant;

use tracing::debug;

use super::{Core, Grant};
use crate::guard::limiter::{Change, Limiter, Sample};

impl<T> Core<T> {
    /// A granted slot is being released: report its query to the limiter.
    pub(super) fn feed_limiter(&mut self, grant: &Grant, now: Instant) {
        let (Some(l), Some(latency)) = (self.limiter.as_mut(), grant.running()) else {
            // Not completed: still counts for the running integral (see `track_running`).
            return;
        };
        let s = Sample {
            latency,
            // Counted before this slot is released: every slot was taken.
            bound: self.active >= self.limit,
        };
        if let Some(c) = l.on_sample(s, now) {
            self.set_limit(c);
        }
    }

    /// The number of running queries changed (after a grant or a release).
    pub(super) fn track_running(&mut self, now: Instant) {
        if let Some(l) = self.limiter.as_mut() {
            l.running(self.active, now);
        }
    }

    /// The pools' connection capacity changed: the limit never exceeds what leases allow.
    pub(super) fn sync_ceiling(&mut self, now: Instant) {
        let Some(l) = self.limiter.as_mut() else {
            return;
        };
        let total = self
            .pools
            .values()
            .filter(|p| p.capacity != usize::MAX)
            .fold(0usize, |a, p| a.saturating_add(p.capacity));
        if total == 0 {
            return;
        }
        if let Some(c) = l.set_ceiling(total, now) {
            self.set_limit(c);
        }
    }

    /// Settings reloaded: start, stop or re-bound the limiter, or take the static limit.
    pub(super) fn reconfigure_limiter(&mut self, now: Instant) {
        match (self.cfg.adaptive.clone(), self.limiter.as_mut()) {
            (Some(a), Some(l)) => {
                if let Some(c) = l.reconfigure(a, now) {
                    self.set_limit(c);
                }
            }
            (Some(a), None) => {
                let start = self.cfg.max_active;
                self.limiter = Some(Limiter::new(a, start, &self.cfg.upstream, now));
                self.sync_ceiling(now);
            }
            (None, _) => self.limiter = None,
        }
        let limit = self
            .limiter
            .as_ref()
            .map_or(self.cfg.max_active, |l| l.limit());
        self.limit = limit;
        for p in self.pools.values() {
            p.m.limit.set(p.limit(limit) as f64);
        }
    }

    fn set_limit(&mut self, c: Change) {
        debug!(upstream = %self.cfg.upstream, "concurrency limit {c}");
        self.limit = c.to;
        for p in self.pools.values() {
            p.m.limit.set(p.limit(c.to) as f64);
        }
    }

    /// The limit the adaptive limiter holds between probes (the static limit otherwise).
    pub(crate) fn base_limit(&self) -> usize {
        self.limiter.as_ref().map_or(self.limit, |l| l.base())
    }
}
