//! The admission state machine: pure, clock passed in, no I/O. See the module doc of
//! `guard` for the queue discipline.

use super::Map;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Gauge;

use super::breaker::{Breaker, Pass};
use super::cohort::Cohorts;
use super::config::GuardConfig;
use super::fair::{self, ident_entry, Ident};
use super::limiter::Limiter;
use super::pools::{pool_entry, Pool};
use super::types::{AdmitRequest, CircuitState, Shed, ShedReason};
use crate::metrics as names;

mod adaptive;
mod codel;
mod grant;
mod outcome;
mod pause;
mod view;

use grant::nanos;
pub(crate) use grant::Grant;

/// `t + d`, saturating far in the future instead of overflowing on absurd settings.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d.min(FAR))
        .or_else(|| t.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(t)
}

/// Immediate answer to an admission request.
#[derive(Debug)]
pub(crate) enum Admission {
    Granted(Grant),
    Shed(Shed),
    /// Waiting as `id`; look again (`check`) at `wake_at` if nothing arrives earlier.
    Queued {
        id: u64,
        wake_at: Instant,
    },
}

/// A waiter's final outcome, to be delivered once the core's lock is released.
#[derive(Debug)]
pub(crate) struct Completion<T> {
    /// Which waiter; the async guard routes by payload, tests by id.
    #[cfg_attr(not(test), allow(dead_code))]
    pub id: u64,
    pub payload: T,
    pub outcome: Result<Grant, Shed>,
}

struct Waiter<T> {
    payload: T,
    pool: Arc<str>,
    identity: Arc<str>,
    enqueued: Instant,
    expires: Instant,
    /// `expires` is the client's own deadline (its statement_timeout), not the queue's.
    client_bound: bool,
    in_tx: bool,
    probe: bool,
    slot: bool,
    lease: bool,
}

/// Admission state of one upstream. `T` is what a waiter is woken with (a channel sender
/// in the async guard, a token in tests).
pub(crate) struct Core<T> {
    cfg: GuardConfig,
    active: usize,
    waiters: Map<u64, Waiter<T>>,
    next_id: u64,
    tx_queue: VecDeque<u64>,
    /// Waiters for a server connection only (a login), FIFO, served before new queries.
    conn_queue: VecDeque<u64>,
    normal_queued: usize,
    idents: Map<Arc<str>, Ident>,
    /// Identities with at least one non-transaction waiter.
    backlogged: Vec<Arc<str>>,
    pools: Map<Arc<str>, Pool>,
    /// Since when the non-transaction queue has been continuously non-empty.
    nonempty_since: Option<Instant>,
    cohorts: Cohorts,
    breaker: Breaker,
    paused: bool,
    /// Databases paused on their own (`PAUSE db`); pools registered later start paused.
    paused_dbs: std::collections::HashSet<String>,
    /// Last time work was wasted: a queued client gave up (left or cancelled), a waiter
    /// timed out, or a client left with its query running.
    last_waste: Option<Instant>,
    circuit_gauge: Gauge,
    /// Slots in force: `cfg.max_active`, or the adaptive limiter's.
    limit: usize,
    limiter: Option<Limiter>,
}

impl<T> Core<T> {
    pub(crate) fn new(cfg: GuardConfig, now: Instant) -> Self {
        let circuit_gauge =
            metrics::gauge!(names::CIRCUIT_STATE, "upstream" => cfg.upstream.clone());
        circuit_gauge.set(CircuitState::Closed.as_gauge());
        let limiter = cfg
            .adaptive
            .clone()
            .map(|a| Limiter::new(a, cfg.max_active, &cfg.upstream, now));
        Core {
            limit: limiter.as_ref().map_or(cfg.max_active, |l| l.limit()),
            limiter,
            cohorts: Cohorts::new(cfg.cohorts, cfg.cohort_rotation, now),
            breaker: Breaker::new(cfg.breaker.clone()),
            cfg,
            active: 0,
            waiters: Map::default(),
            next_id: 0,
            tx_queue: VecDeque::new(),
            conn_queue: VecDeque::new(),
            normal_queued: 0,
            idents: Map::default(),
            backlogged: Vec::new(),
            pools: Map::default(),
            nonempty_since: None,
            paused: false,
            paused_dbs: Default::default(),
            last_waste: None,
            circuit_gauge,
        }
    }

    pub(crate) fn active(&self) -> usize {
        self.active
    }

    pub(crate) fn queued(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    #[cfg(test)]
    pub(crate) fn next_id_for_tests(&self) -> u64 {
        self.next_id
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    pub(crate) fn admit(
        &mut self,
        req: AdmitRequest,
        now: Instant,
        payload: impl FnOnce() -> T,
    ) -> Admission {
        if !req.slot {
            // A login waits for a server connection only: it runs no query, so neither the
            // breaker (the connect itself reports to it) nor the cohort filter applies.
            return self.admit_inner(req, now, false, payload);
        }
        let probe = match self.breaker.pass(now) {
            Pass::No => {
                self.sync_circuit_gauge(now);
                return Admission::Shed(self.shed_arrival(&req, ShedReason::CircuitOpen));
            }
            Pass::Yes => false,
            Pass::Probe => true,
        };
        if probe {
            self.sync_circuit_gauge(now);
        }
        let pressure = self.under_pressure(now);
        self.cohorts.adjust(pressure, self.cfg.codel_interval, now);
        let result = self.admit_inner(req, now, probe, payload);
        if probe && matches!(result, Admission::Shed(_)) {
            self.breaker.probe_abandoned();
        }
        result
    }

    fn admit_inner(
        &mut self,
        req: AdmitRequest,
        now: Instant,
        probe: bool,
        payload: impl FnOnce() -> T,
    ) -> Admission {
        let limit = self.limit;
        let p = pool_entry(&mut self.pools, &req.pool, limit);
        if req.lease && p.capacity != req.capacity {
            p.capacity = req.capacity;
            self.sync_ceiling(now);
        }
        let limit = self.limit;
        let p = pool_entry(&mut self.pools, &req.pool, limit);
        let lease_ok = !req.lease || p.lease_free();
        let slot_ok = !req.slot || (self.active < limit && p.slot_free());
        let paused = self.paused || p.paused;
        let pool_queue_full = p.limits.max_queue.is_some_and(|m| p.normal_queued >= m);
        let queue_timeout = p.limits.queue_timeout.unwrap_or(self.cfg.queue_timeout);
        // Every waiter left in a queue is one the last dispatch could not serve (no slot, no
        // connection of its pool, or paused); so a request whose resources are free now takes
        // them without overtaking anyone who could have used them.
        if !req.slot {
            if !paused && lease_ok {
                return Admission::Granted(self.grant_counts(&req, Duration::ZERO, false, now));
            }
        } else if req.in_transaction {
            if slot_ok && lease_ok {
                return Admission::Granted(self.grant_counts(&req, Duration::ZERO, probe, now));
            }
        } else {
            let mid_request = req
                .last_admitted
                .is_some_and(|t| now.saturating_duration_since(t) <= self.cfg.mid_request_window);
            if !mid_request && !self.cohorts.allows(req.client_id, now) {
                return Admission::Shed(self.shed_arrival(&req, ShedReason::Cohort));
            }
            if !paused && slot_ok && lease_ok {
                return Admission::Granted(self.grant_counts(&req, Duration::ZERO, probe, now));
            }
            if self.normal_queued >= self.cfg.max_queue || pool_queue_full {
                return Admission::Shed(self.shed_arrival(&req, ShedReason::QueueFull));
            }
        }
        let mut expires = later(now, queue_timeout);
        let client_bound = req.deadline.is_some_and(|d| d < expires);
        if let Some(d) = req.deadline {
            expires = expires.min(d);
        }
        if expires <= now {
            let reason = if client_bound {
                ShedReason::StatementTimeout
            } else if paused && !req.in_transaction {
                ShedReason::Paused
            } else {
                ShedReason::QueueTimeout
            };
            return Admission::Shed(self.shed_arrival(&req, reason));
        }
        let id = self.next_id;
        self.next_id += 1;
        let limit = self.limit;
        let p = pool_entry(&mut self.pools, &req.pool, limit);
        p.queued += 1;
        p.m.queued.set(p.queued as f64);
        let share = p.limits.share;
        let ident = ident_entry(&mut self.idents, &req.identity, &self.cfg, &req.pool, share);
        if !req.slot {
            self.conn_queue.push_back(id);
        } else if req.in_transaction {
            ident.tx_queued += 1;
            self.tx_queue.push_back(id);
        } else {
            if ident.queue.is_empty() {
                self.backlogged.push(req.identity.clone());
            }
            ident.queue.push_back(id);
            p.normal_queued += 1;
            if self.normal_queued == 0 {
                self.nonempty_since = Some(now);
            }
            self.normal_queued += 1;
        }
        let w = Waiter {
            payload: payload(),
            pool: req.pool,
            identity: req.identity,
            enqueued: now,
            expires,
            client_bound,
            in_tx: req.in_transaction,
            probe,
            slot: req.slot,
            lease: req.lease,
        };
        let wake_at = self.wake_at(&w, now);
        self.waiters.insert(id, w);
        Admission::Queued { id, wake_at }
    }

    /// A granted query finished: free its slot (and its lease, if it still holds one) and
    /// hand them on.
    pub(crate) fn release(&mut self, grant: &Grant, now: Instant, out: &mut Vec<Completion<T>>) {
        if grant.slot {
            self.feed_limiter(grant, now);
            self.active = self.active.saturating_sub(1);
            self.track_running(now);
            if let Some(p) = self.pools.get_mut(&*grant.pool) {
                p.active = p.active.saturating_sub(1);
                p.m.active.set(p.active as f64);
            }
            if let Some(i) = self.idents.get_mut(&*grant.identity) {
                i.active = i.active.saturating_sub(1);
            }
        }
        if grant.lease {
            self.drop_lease(&grant.pool);
        }
        if grant.probe {
            // No verdict was reported for the probe: let another request probe.
            self.breaker.probe_abandoned();
        }
        self.dispatch(now, out);
    }

    /// A session gave its server connection back to the pool.
    pub(crate) fn release_lease(&mut self, pool: &str, now: Instant, out: &mut Vec<Completion<T>>) {
        self.drop_lease(pool);
        self.dispatch(now, out);
    }

    fn drop_lease(&mut self, pool: &str) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.leased = p.leased.saturating_sub(1);
        }
    }

    /// Look at one waiter on its timer: shed it if due, else say when to look again.
    /// `None` means it is no longer waiting.
    pub(crate) fn check(
        &mut self,
        id: u64,
        now: Instant,
        out: &mut Vec<Completion<T>>,
    ) -> Option<Instant> {
        let w = self.waiters.get(&id)?;
        if let Some(reason) = self.due_reason(w, now) {
            self.shed_waiter(id, reason, now, out);
            return None;
        }
        Some(self.wake_at(w, now))
    }

    /// Shed every waiter that is due.
    #[cfg(test)]
    pub(crate) fn expire_due(&mut self, now: Instant, out: &mut Vec<Completion<T>>) {
        let mut ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.check(id, now, out);
        }
    }

    /// The waiter's future was dropped: forget it without a word.
    pub(crate) fn abandon(&mut self, id: u64, now: Instant) -> bool {
        match self.remove_waiter(id) {
            Some(w) => {
                self.record_waste(now);
                if w.probe {
                    self.breaker.probe_abandoned();
                }
                true
            }
            None => false,
        }
    }

    /// The breaker is closed with no failure counted (see `Guard::record_success`).
    pub(crate) fn breaker_clean(&self) -> bool {
        self.breaker.is_clean()
    }

    pub(crate) fn reset_breaker(&mut self, now: Instant) {
        self.breaker.reset();
        self.sync_circuit_gauge(now);
    }

    pub(crate) fn record_success(&mut self, now: Instant) {
        self.breaker.record_success(now);
        self.sync_circuit_gauge(now);
    }

    pub(crate) fn record_failure(&mut self, now: Instant, out: &mut Vec<Completion<T>>) {
        if self.breaker.record_failure(now) {
            let mut ids: Vec<u64> = self.waiters.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.shed_waiter(id, ShedReason::CircuitOpen, now, out);
            }
        }
        self.sync_circuit_gauge(now);
    }

    pub(crate) fn circuit_state(&mut self, now: Instant) -> CircuitState {
        self.sync_circuit_gauge(now)
    }

    fn sync_circuit_gauge(&self, now: Instant) -> CircuitState {
        let s = self.breaker.state(now);
        self.circuit_gauge.set(s.as_gauge());
        s
    }

    pub(crate) fn pause(&mut self) {
        self.paused = true;
    }

    pub(crate) fn resume(&mut self, now: Instant, out: &mut Vec<Completion<T>>) {
        if !self.paused {
            return;
        }
        self.paused = false;
        // Time spent paused is not a standing queue.
        self.nonempty_since = (self.normal_queued > 0).then_some(now);
        self.dispatch(now, out);
    }

    /// Live reload: nobody queued or running is dropped; a lower limit is reached as
    /// running queries finish. Waiters keep the timeout they were given.
    pub(crate) fn update_config(
        &mut self,
        cfg: GuardConfig,
        now: Instant,
        out: &mut Vec<Completion<T>>,
    ) {
        self.cohorts.reconfigure(cfg.cohorts, cfg.cohort_rotation);
        self.breaker.set_config(cfg.breaker.clone());
        for p in self.pools.values_mut() {
            if let Some((d, u)) = &p.names {
                p.limits = cfg.pools.resolve(d, u);
            }
        }
        for (name, ident) in self.idents.iter_mut() {
            let share = self.pools.get(&*ident.pool).and_then(|p| p.limits.share);
            ident.weight = cfg.weight_of(name, share);
        }
        self.cfg = cfg;
        self.reconfigure_limiter(now);
        self.dispatch(now, out);
    }

    /// Hand free slots and connections to waiters: open transactions first (they need only
    /// a slot), then logins (only a connection), then the backlogged identity with the
    /// smallest active/weight, FIFO within it (LIFO while the queue stands), skipping
    /// waiters whose pool has no connection to spare.
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Completion<T>>) {
        // Each pass removes one waiter, so this ends.
        loop {
            let slot_free = self.active < self.limit;
            let id = if let Some(id) = self.first_eligible(&self.tx_queue).filter(|_| slot_free) {
                id
            } else if let Some(id) = self.first_eligible(&self.conn_queue) {
                id
            } else if !slot_free || self.paused || self.normal_queued == 0 {
                break;
            } else {
                match self.pick_normal(now) {
                    Some(id) => id,
                    None => break,
                }
            };
            let Some(w) = self.waiters.get(&id) else {
                debug_assert!(false, "queued id without a waiter");
                break;
            };
            if let Some(reason) = self.due_reason_freed(w, now, 1) {
                self.shed_waiter(id, reason, now, out);
                continue;
            }
            if let Some(w) = self.remove_waiter(id) {
                let waited = now.saturating_duration_since(w.enqueued);
                let grant = self.grant_waiter(&w, waited, now);
                out.push(Completion {
                    id,
                    payload: w.payload,
                    outcome: Ok(grant),
                });
            }
        }
    }

    /// Whether a waiter's resources are free now (its slot, its pool's connection). Runs for
    /// every queued waiter on a release: the pool is looked up once, after the checks that
    /// need no lookup.
    fn eligible(&self, id: u64) -> bool {
        let Some(w) = self.waiters.get(&id) else {
            return false;
        };
        if w.slot && self.active >= self.limit {
            return false;
        }
        let p = self.pools.get(&*w.pool);
        // Statements of open transactions pass a pause, so that they can finish.
        (w.in_tx || !self.pool_paused(p))
            && (!w.slot || p.map_or(true, Pool::slot_free))
            && (!w.lease || p.map_or(true, Pool::lease_free))
    }

    fn first_eligible(&self, q: &VecDeque<u64>) -> Option<u64> {
        q.iter().copied().find(|&id| self.eligible(id))
    }

    fn pick_normal(&self, now: Instant) -> Option<u64> {
        fair::pick(&self.backlogged, &self.idents, self.standing(now), |id| {
            self.eligible(id)
        })
    }

    fn remove_waiter(&mut self, id: u64) -> Option<Waiter<T>> {
        let w = self.waiters.remove(&id)?;
        if let Some(p) = self.pools.get_mut(&*w.pool) {
            p.queued = p.queued.saturating_sub(1);
            p.m.queued.set(p.queued as f64);
        }
        if !w.slot {
            if let Some(pos) = self.conn_queue.iter().position(|&x| x == id) {
                self.conn_queue.remove(pos);
            }
        } else if w.in_tx {
            if let Some(pos) = self.tx_queue.iter().position(|&x| x == id) {
                self.tx_queue.remove(pos);
            }
            if let Some(i) = self.idents.get_mut(&*w.identity) {
                i.tx_queued = i.tx_queued.saturating_sub(1);
            }
        } else {
            if let Some(i) = self.idents.get_mut(&*w.identity) {
                if let Some(pos) = i.queue.iter().position(|&x| x == id) {
                    i.queue.remove(pos);
                }
                if i.queue.is_empty() {
                    self.backlogged.retain(|n| **n != *w.identity);
                }
            }
            if let Some(p) = self.pools.get_mut(&*w.pool) {
                p.normal_queued = p.normal_queued.saturating_sub(1);
            }
            self.normal_queued = self.normal_queued.saturating_sub(1);
            if self.normal_queued == 0 {
                self.nonempty_since = None;
            }
        }
        Some(w)
    }
}
