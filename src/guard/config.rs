//! Guard tuning knobs and their defaults.

use std::collections::HashMap;
use std::time::Duration;

pub use super::limiter::AdaptiveConfig;

/// Admission-control settings for one upstream.
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// Upstream name, the `upstream` label of the circuit-state gauge.
    pub upstream: String,
    /// Cap on queries actively running upstream (all pools of one upstream); ignored while
    /// `adaptive` is set.
    pub max_active: usize,
    /// `--max-active auto`: the limit follows the database's measured throughput within
    /// these bounds.
    pub adaptive: Option<AdaptiveConfig>,
    /// Waiting queries beyond which new ones are shed at once.
    pub max_queue: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
    /// How long the queue must stay non-empty before it counts as standing.
    pub codel_interval: Duration,
    /// While the queue stands, waiters older than this are shed.
    ///
    /// 50 ms: a few typical OLTP query durations, so ordinary jitter in slot turnover is
    /// absorbed, yet far below the point where a client notices or its own timeout fires.
    /// The 5 ms used for RPC queues would shed on mere scheduling noise for SQL.
    pub codel_target: Duration,
    /// A client that had a query admitted within this window is mid-request.
    pub mid_request_window: Duration,
    /// Number of client cohorts for consistent shedding (at least 1).
    pub cohorts: u32,
    /// How often the cohort priority order rotates.
    pub cohort_rotation: Duration,
    /// Identity -> fair-share weight; unlisted identities weigh 1.
    pub shares: HashMap<String, u32>,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Bounds of single pools (`[databases.NAME]`, `[users.NAME]`), under the ones above.
    pub pools: PoolLimitTable,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            upstream: "default".to_string(),
            max_active: 20,
            adaptive: None,
            max_queue: 1000,
            queue_timeout: Duration::from_secs(5),
            codel_interval: Duration::from_millis(100),
            codel_target: Duration::from_millis(50),
            mid_request_window: Duration::from_millis(300),
            cohorts: 16,
            cohort_rotation: Duration::from_secs(60),
            shares: HashMap::new(),
            breaker: BreakerConfig::default(),
            pools: PoolLimitTable::default(),
        }
    }
}

impl GuardConfig {
    /// Fair-share weight of an identity (never 0): its `--share`, else the `share` of the
    /// pool its queries come from, else 1.
    pub fn weight_of(&self, identity: &str, pool_share: Option<u32>) -> u32 {
        self.shares
            .get(identity)
            .copied()
            .or(pool_share)
            .unwrap_or(1)
            .max(1)
    }
}

/// Circuit-breaker settings.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Cool-down after the first opening; doubles on each re-open.
    pub base_cooldown: Duration,
    /// Ceiling of the cool-down.
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            base_cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

/// Bounds of one pool, under the upstream's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    /// Slots the pool's queries may hold at once. In a table entry `usize::MAX` stands for
    /// an explicit "no cap of its own" (`auto`), which a user entry uses to lift its
    /// database's cap; resolved limits never hold it.
    pub max_active: Option<usize>,
    /// The pool's queries (outside transactions) that may wait at once.
    pub max_queue: Option<usize>,
    /// Longest wait of the pool's queries, instead of `queue_timeout`.
    pub queue_timeout: Option<Duration>,
    /// Fair-share weight of the identities whose queries come from this pool (an
    /// identity's own `--share` wins).
    pub share: Option<u32>,
}

/// Pool bounds by database and by user name; a user's entry wins field by field.
#[derive(Clone, Debug, Default)]
pub struct PoolLimitTable {
    pub databases: HashMap<String, PoolLimits>,
    pub users: HashMap<String, PoolLimits>,
}

impl PoolLimitTable {
    pub fn resolve(&self, database: &str, user: &str) -> PoolLimits {
        let (d, u) = (self.databases.get(database), self.users.get(user));
        let max_active = u
            .and_then(|u| u.max_active)
            .or(d.and_then(|d| d.max_active));
        PoolLimits {
            max_active: max_active.filter(|&n| n != usize::MAX),
            max_queue: u.and_then(|u| u.max_queue).or(d.and_then(|d| d.max_queue)),
            queue_timeout: u
                .and_then(|u| u.queue_timeout)
                .or(d.and_then(|d| d.queue_timeout)),
            share: u.and_then(|u| u.share).or(d.and_then(|d| d.share)),
        }
    }
}
