//! Per-pool counters and their metric handles.

use super::Map;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};

use super::config::PoolLimits;
use super::types::ShedReason;
use crate::metrics as names;

pub(crate) struct PoolMetrics {
    pub active: Gauge,
    pub queued: Gauge,
    pub limit: Gauge,
    pub wait: Histogram,
    pub shed: [Counter; 7],
}

impl PoolMetrics {
    fn new(pool: &str) -> Self {
        let label = || ("pool", pool.to_string());
        let shed = ShedReason::ALL.map(|r| {
            metrics::counter!(names::SHED_TOTAL, "pool" => pool.to_string(), "reason" => r.as_str())
        });
        PoolMetrics {
            active: metrics::gauge!(names::ACTIVE_QUERIES, &[label()]),
            queued: metrics::gauge!(names::QUEUE_DEPTH, &[label()]),
            limit: metrics::gauge!(names::CONCURRENCY_LIMIT, &[label()]),
            wait: metrics::histogram!(names::QUEUE_WAIT_SECONDS, &[label()]),
            shed,
        }
    }
}

pub(crate) struct Pool {
    pub active: usize,
    pub queued: usize,
    /// Server connections handed to sessions (leases), at most `capacity`.
    pub leased: usize,
    pub capacity: usize,
    /// Waiters outside transactions (what `max_queue` bounds).
    pub normal_queued: usize,
    /// Names the pool was registered with (`Core::register_pool`); None for a pool only
    /// ever named by its label (tests).
    pub names: Option<(String, String)>,
    /// Its own bounds from `[databases]` / `[users]`.
    pub limits: PoolLimits,
    /// Its database is paused (`PAUSE db`, `KILL db`).
    pub paused: bool,
    pub m: PoolMetrics,
}

impl Pool {
    pub fn lease_free(&self) -> bool {
        self.leased < self.capacity
    }

    /// Under the pool's own cap on running queries.
    pub fn slot_free(&self) -> bool {
        self.limits.max_active.map_or(true, |m| self.active < m)
    }

    /// Slots in force for this pool: its own cap under the upstream's `limit`.
    pub fn limit(&self, limit: usize) -> usize {
        self.limits.max_active.map_or(limit, |m| m.min(limit))
    }
}

pub(crate) fn pool_entry<'a>(
    pools: &'a mut Map<Arc<str>, Pool>,
    name: &Arc<str>,
    limit: usize,
) -> &'a mut Pool {
    if !pools.contains_key(&**name) {
        let m = PoolMetrics::new(name);
        m.limit.set(limit as f64);
        pools.insert(
            name.clone(),
            Pool {
                active: 0,
                queued: 0,
                leased: 0,
                capacity: usize::MAX,
                normal_queued: 0,
                names: None,
                limits: PoolLimits::default(),
                paused: false,
                m,
            },
        );
    }
    pools.get_mut(&**name).expect("pool entry just ensured")
}
