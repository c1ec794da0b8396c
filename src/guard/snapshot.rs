//! Serializable view of a guard for the admin `/pools` endpoint.

use std::collections::BTreeMap;

use serde::Serialize;

use super::types::CircuitState;

#[derive(Debug, Clone, Serialize)]
pub struct GuardSnapshot {
    pub upstream: String,
    pub active: usize,
    /// Slots in force (a probe's, while the adaptive limiter probes).
    pub limit: usize,
    /// `--max-active auto`: the limit held between probes; the static limit otherwise.
    pub base_limit: usize,
    pub adaptive: bool,
    pub queued: usize,
    pub paused: bool,
    /// Databases paused on their own.
    pub paused_databases: Vec<String>,
    pub circuit: CircuitState,
    /// True while the queue has stood longer than the CoDel interval.
    pub standing_queue: bool,
    /// Cohorts currently admitted for new work, out of `cohorts`.
    pub admitted_cohorts: u32,
    pub cohorts: u32,
    pub pools: BTreeMap<String, PoolSnapshot>,
    pub identities: BTreeMap<String, IdentitySnapshot>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub active: usize,
    pub queued: usize,
    /// Server connections held by sessions, out of `capacity`.
    pub leased: usize,
    pub capacity: usize,
    /// Slots in force for the pool: its own `max-active` under the upstream's limit.
    pub limit: usize,
    /// Its database is paused on its own (`PAUSE db`, `KILL db`).
    pub paused: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdentitySnapshot {
    pub active: usize,
    pub queued: usize,
    pub weight: u32,
    pub admitted_total: u64,
    pub shed_total: u64,
}
