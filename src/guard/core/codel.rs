//! When a queue is standing and who in it may be refused: CoDel gated by waste and by the
//! database being the bottleneck (see the module doc of `guard`).

use std::time::{Duration, Instant};

use super::{later, Core, Waiter};
use crate::guard::pools::Pool;
use crate::guard::types::ShedReason;

/// CoDel intervals after the last wasted work during which a standing queue is shed.
const WASTE_WINDOW: u32 = 10;

impl<T> Core<T> {
    /// A standing queue: for a whole CoDel interval the queue has not been empty and its
    /// oldest query has been waiting at least that long. A queue that is never empty but
    /// drains fast (closed-loop clients outnumbering the slots) is healthy and does not
    /// count; a burst that drains within the interval does not either.
    pub(crate) fn standing(&self, now: Instant) -> bool {
        if self.paused || !self.wasting(now) {
            return false;
        }
        let Some(since) = self.nonempty_since else {
            return false;
        };
        let iv = self.cfg.codel_interval;
        if now.saturating_duration_since(since) < iv {
            return false;
        }
        self.oldest_normal()
            .is_some_and(|t| now.saturating_duration_since(t) >= iv)
    }

    /// Overload as the request-level (cohort) filter sees it: the queue has not emptied for an
    /// interval and its oldest query has waited past the target. This is a lighter test than
    /// `standing`, on purpose: refusing new requests at the door is cheap and keeps admitted
    /// requests fast, while shedding queued queries (which may be mid-request) waits for a
    /// truly standing queue.
    pub(super) fn under_pressure(&self, now: Instant) -> bool {
        if self.paused || !self.wasting(now) {
            return false;
        }
        let Some(since) = self.nonempty_since else {
            return false;
        };
        if now.saturating_duration_since(since) < self.cfg.codel_interval {
            return false;
        }
        self.oldest_normal_waiter().is_some_and(|w| {
            now.saturating_duration_since(w.enqueued) >= self.cfg.codel_target
                && self.database_bound(w)
        })
    }

    /// Work was wasted within the last `WASTE_WINDOW` CoDel intervals. A long queue that
    /// nobody gives up on (closed-loop clients outnumbering the slots, a pool smaller than
    /// the client count) is stable: every waiter is served within its queue timeout, and
    /// refusing it would only turn waiting into errors. Shedding starts once clients show
    /// they are not waiting that long.
    pub(super) fn wasting(&self, now: Instant) -> bool {
        let window = self.cfg.codel_interval.saturating_mul(WASTE_WINDOW);
        self.last_waste
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
    }

    /// Work was wasted (see `wasting`).
    pub(crate) fn record_waste(&mut self, now: Instant) {
        self.last_waste = Some(now);
    }

    /// The waiter is held back by the database's own concurrency: every slot is taken, or
    /// every connection of its pool is running a query. A waiter held back by connections
    /// that sit idle in a transaction (the clients are slow, not the database) or by a pause
    /// is not: refusing it would relieve nothing.
    pub(super) fn database_bound(&self, w: &Waiter<T>) -> bool {
        self.bound_by_running(w, 0)
    }

    /// `database_bound`, counting `freed` slots just released as still running (in
    /// dispatch, the resource the waiter is about to get was busy until this instant).
    pub(super) fn bound_by_running(&self, w: &Waiter<T>, freed: usize) -> bool {
        let p = self.pools.get(&*w.pool);
        self.active + freed >= self.limit
            || p.is_some_and(|p| p.limits.max_active.is_some_and(|m| p.active + freed >= m))
            || (w.lease && p.is_some_and(|p| p.active + freed >= p.capacity))
    }

    /// Arrival time of the longest-waiting normal (not in-transaction) query.
    pub(super) fn oldest_normal(&self) -> Option<Instant> {
        self.oldest_normal_waiter().map(|w| w.enqueued)
    }

    /// The longest-waiting query outside transactions that the database holds back: the
    /// waiters of a paused database wait for the operator, not for the database, and must
    /// not make the others' queue look standing.
    pub(super) fn oldest_normal_waiter(&self) -> Option<&Waiter<T>> {
        let free = |id: &u64| {
            self.paused_dbs.is_empty()
                || self.waiters.get(id).is_some_and(|w| !self.waiter_paused(w))
        };
        self.backlogged
            .iter()
            .filter_map(|n| self.idents.get(n)?.queue.iter().find(|id| free(id)))
            .min()
            .and_then(|id| self.waiters.get(id))
    }

    pub(super) fn due_reason(&self, w: &Waiter<T>, now: Instant) -> Option<ShedReason> {
        self.due_reason_freed(w, now, 0)
    }

    pub(super) fn due_reason_freed(
        &self,
        w: &Waiter<T>,
        now: Instant,
        freed: usize,
    ) -> Option<ShedReason> {
        if now >= w.expires {
            return Some(if w.client_bound {
                ShedReason::StatementTimeout
            } else if !w.in_tx && self.waiter_paused(w) {
                ShedReason::Paused
            } else {
                ShedReason::QueueTimeout
            });
        }
        if !w.in_tx
            && w.slot
            && !self.waiter_paused(w)
            && self.bound_by_running(w, freed)
            && self.standing(now)
            && now.saturating_duration_since(w.enqueued) >= self.cfg.codel_target
        {
            return Some(ShedReason::StandingQueue);
        }
        None
    }

    /// The waiter's pool is paused (the whole proxy, or its database).
    pub(super) fn waiter_paused(&self, w: &Waiter<T>) -> bool {
        self.pool_paused(self.pools.get(&*w.pool))
    }

    /// The one pause rule: everything, or the pool's database.
    pub(super) fn pool_paused(&self, p: Option<&Pool>) -> bool {
        self.paused || p.is_some_and(|p| p.paused)
    }

    pub(super) fn wake_at(&self, w: &Waiter<T>, now: Instant) -> Instant {
        match self.nonempty_since {
            Some(since) if !w.in_tx && w.slot && !self.waiter_paused(w) => {
                // Standing from when both the queue and its oldest waiter are an interval old.
                let oldest = self.oldest_normal().unwrap_or(w.enqueued);
                let codel = later(since.max(oldest), self.cfg.codel_interval)
                    .max(later(w.enqueued, self.cfg.codel_target));
                // Past that time but not due (no waste, or not held back by the database):
                // look again an interval later, when either may have changed.
                let codel = if codel <= now {
                    later(now, self.cfg.codel_interval.max(Duration::from_millis(1)))
                } else {
                    codel
                };
                codel.min(w.expires)
            }
            _ => w.expires,
        }
    }
}
