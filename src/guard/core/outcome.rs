//! Granting a slot (and lease) and refusing a query: the counts, metrics and outcome of
//! each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{nanos, Completion, Core, Grant, Waiter};
use crate::guard::fair::ident_entry;
use crate::guard::pools::pool_entry;
use crate::guard::types::{AdmitRequest, Shed, ShedReason};

impl<T> Core<T> {
    pub(super) fn grant_counts(
        &mut self,
        req: &AdmitRequest,
        waited: Duration,
        probe: bool,
        now: Instant,
    ) -> Grant {
        let g = self.grant(&req.pool, &req.identity, waited, probe, req.slot, req.lease);
        if req.slot {
            self.track_running(now);
        }
        g
    }

    pub(super) fn grant_waiter(&mut self, w: &Waiter<T>, waited: Duration, now: Instant) -> Grant {
        let g = self.grant(&w.pool, &w.identity, waited, w.probe, w.slot, w.lease);
        if w.slot {
            self.track_running(now);
        }
        g
    }

    fn grant(
        &mut self,
        pool: &Arc<str>,
        identity: &Arc<str>,
        waited: Duration,
        probe: bool,
        slot: bool,
        lease: bool,
    ) -> Grant {
        let p = pool_entry(&mut self.pools, pool, self.limit);
        p.m.wait.record(waited.as_secs_f64());
        if lease {
            p.leased += 1;
        }
        if slot {
            p.active += 1;
            p.m.active.set(p.active as f64);
            self.active += 1;
            let share = p.limits.share;
            let i = ident_entry(&mut self.idents, identity, &self.cfg, pool, share);
            i.active += 1;
            i.admitted_total += 1;
        }
        Grant {
            pool: pool.clone(),
            identity: identity.clone(),
            waited_ns: nanos(waited),
            running_ns: 0,
            probe,
            slot,
            lease,
        }
    }

    pub(super) fn shed_waiter(
        &mut self,
        id: u64,
        reason: ShedReason,
        now: Instant,
        out: &mut Vec<Completion<T>>,
    ) {
        if let Some(w) = self.remove_waiter(id) {
            if w.probe {
                self.breaker.probe_abandoned();
            }
            if matches!(
                reason,
                ShedReason::QueueTimeout | ShedReason::StatementTimeout
            ) {
                // The client waited its whole bound for nothing.
                self.record_waste(now);
            }
            let waited = now.saturating_duration_since(w.enqueued);
            let shed = self.count_shed(&w.pool, &w.identity, reason, waited);
            out.push(Completion {
                id,
                payload: w.payload,
                outcome: Err(shed),
            });
        }
    }

    pub(super) fn shed_arrival(&mut self, req: &AdmitRequest, reason: ShedReason) -> Shed {
        self.count_shed(&req.pool, &req.identity, reason, Duration::ZERO)
    }

    fn count_shed(
        &mut self,
        pool: &Arc<str>,
        identity: &Arc<str>,
        reason: ShedReason,
        waited: Duration,
    ) -> Shed {
        let p = pool_entry(&mut self.pools, pool, self.limit);
        p.m.shed[reason.index()].increment(1);
        p.m.wait.record(waited.as_secs_f64());
        let share = p.limits.share;
        ident_entry(&mut self.idents, identity, &self.cfg, pool, share).shed_total += 1;
        Shed {
            reason,
            waited,
            active: self.active,
            limit: self.limit,
            queued: self.waiters.len(),
        }
    }
}
