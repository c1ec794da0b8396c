//! Consistent shedding by client cohort ("shed requests, not queries").
//!
//! Clients hash into `cohorts` buckets. A bucket's rank is `(bucket + epoch) % cohorts`, where
//! the epoch advances every rotation period, so the priority order shifts by one bucket per
//! period. An overload level says how many ranks are admitted: while the queue stands it
//! drops by one per CoDel interval (never below one), otherwise it climbs back by one per
//! interval. New work from a client whose rank is not admitted is refused at once; a client
//! that is mid-request, or inside a transaction, bypasses the filter so it can finish.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Cohorts {
    count: u32,
    rotation: Duration,
    origin: Instant,
    admitted: u32,
    adjusted_at: Instant,
}

/// Well-mixed 64-bit hash so sequential client ids spread over the buckets.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Cohorts {
    pub(crate) fn new(count: u32, rotation: Duration, now: Instant) -> Self {
        let count = count.max(1);
        Cohorts {
            count,
            rotation,
            origin: now,
            admitted: count,
            adjusted_at: now,
        }
    }

    pub(crate) fn reconfigure(&mut self, count: u32, rotation: Duration) {
        let count = count.max(1);
        if count != self.count {
            // Keep the admitted fraction roughly where it was.
            let frac = self.admitted as u64 * count as u64 / self.count as u64;
            self.admitted = (frac as u32).clamp(1, count);
            self.count = count;
        }
        self.rotation = rotation;
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn admitted(&self) -> u32 {
        self.admitted
    }

    /// Rank of a client's cohort in the current rotation epoch (0 = most favoured).
    pub(crate) fn rank(&self, client_id: u64, now: Instant) -> u32 {
        let n = self.count as u64;
        let bucket = mix(client_id) % n;
        let epoch = if self.rotation.is_zero() {
            0
        } else {
            let e = now.saturating_duration_since(self.origin).as_nanos() / self.rotation.as_nanos();
            (e % n as u128) as u64
        };
        ((bucket + epoch) % n) as u32
    }

    pub(crate) fn allows(&self, client_id: u64, now: Instant) -> bool {
        self.admitted >= self.count || self.rank(client_id, now) < self.admitted
    }

    /// Step the overload level once per elapsed `interval`.
    pub(crate) fn adjust(&mut self, standing: bool, interval: Duration, now: Instant) {
        if interval.is_zero() {
            return;
        }
        let elapsed = now.saturating_duration_since(self.adjusted_at);
        if elapsed < interval {
            return;
        }
        let steps = (elapsed.as_nanos() / interval.as_nanos()).min(u32::MAX as u128) as u32;
        self.adjusted_at = now;
        if standing {
            self.admitted = self.admitted.saturating_sub(steps).max(1);
        } else {
            self.admitted = self.admitted.saturating_add(steps).min(self.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_spread_over_all_buckets() {
        let t0 = Instant::now();
        let c = Cohorts::new(16, Duration::from_secs(60), t0);
        let mut hits = [0u32; 16];
        for id in 0..1600u64 {
            hits[c.rank(id, t0) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h > 50 && h < 150), "{hits:?}");
    }

    #[test]
    fn rotation_shifts_rank_by_one_per_period() {
        let t0 = Instant::now();
        let c = Cohorts::new(8, Duration::from_secs(60), t0);
        let r0 = c.rank(42, t0);
        assert_eq!(c.rank(42, t0 + Duration::from_secs(59)), r0);
        assert_eq!(c.rank(42, t0 + Duration::from_secs(60)), (r0 + 1) % 8);
    }

    #[test]
    fn level_falls_while_standing_and_recovers() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(100);
        let mut c = Cohorts::new(4, Duration::from_secs(60), t0);
        c.adjust(true, iv, t0 + Duration::from_millis(50));
        assert_eq!(c.admitted(), 4);
        c.adjust(true, iv, t0 + Duration::from_millis(100));
        assert_eq!(c.admitted(), 3);
        c.adjust(true, iv, t0 + Duration::from_millis(1000));
        assert_eq!(c.admitted(), 1, "never below one cohort");
        c.adjust(false, iv, t0 + Duration::from_millis(1200));
        assert_eq!(c.admitted(), 3);
    }
}
