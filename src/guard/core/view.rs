//! Read-only view of the core for the admin API.

use std::collections::BTreeMap;
use std::time::Instant;

use super::Core;
use crate::guard::snapshot::{GuardSnapshot, IdentitySnapshot, PoolSnapshot};

impl<T> Core<T> {
    pub(crate) fn snapshot(&mut self, now: Instant) -> GuardSnapshot {
        let circuit = self.sync_circuit_gauge(now);
        let pools = self
            .pools
            .iter()
            .map(|(k, p)| {
                let s = PoolSnapshot {
                    active: p.active,
                    queued: p.queued,
                    leased: p.leased,
                    capacity: p.capacity,
                    limit: p.limit(self.limit),
                    paused: p.paused,
                };
                (k.to_string(), s)
            })
            .collect::<BTreeMap<_, _>>();
        let identities = self
            .idents
            .iter()
            .map(|(k, i)| {
                let s = IdentitySnapshot {
                    active: i.active,
                    queued: i.queue.len() + i.tx_queued,
                    weight: i.weight,
                    admitted_total: i.admitted_total,
                    shed_total: i.shed_total,
                };
                (k.to_string(), s)
            })
            .collect::<BTreeMap<_, _>>();
        GuardSnapshot {
            upstream: self.cfg.upstream.clone(),
            active: self.active,
            limit: self.limit,
            base_limit: self.base_limit(),
            adaptive: self.limiter.is_some(),
            queued: self.waiters.len(),
            paused: self.paused,
            paused_databases: self.paused_databases(),
            circuit,
            standing_queue: self.standing(now),
            admitted_cohorts: self.cohorts.admitted(),
            cohorts: self.cohorts.count(),
            pools,
            identities,
        }
    }
}
