//! Per-pool counters and their metric handles.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};

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
    pub m: PoolMetrics,
}

impl Pool {
    pub fn lease_free(&self) -> bool {
        self.leased < self.capacity
    }
}

pub(crate) fn pool_entry<'a>(
    pools: &'a mut HashMap<Arc<str>, Pool>,
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
                m,
            },
        );
    }
    pools.get_mut(&**name).expect("pool entry just ensured")
}
