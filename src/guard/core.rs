//! The admission state machine: pure, clock passed in, no I/O. See the module doc of
//! `guard` for the queue discipline.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Gauge;

use super::breaker::{Breaker, Pass};
use super::cohort::Cohorts;
use super::config::GuardConfig;
use super::fair::{self, ident_entry, Ident};
use super::pools::{pool_entry, Pool};
use super::snapshot::{GuardSnapshot, IdentitySnapshot, PoolSnapshot};
use super::types::{AdmitRequest, CircuitState, Shed, ShedReason};
use crate::metrics as names;

/// `t + d`, saturating far in the future instead of overflowing on absurd settings.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d.min(FAR))
        .or_else(|| t.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(t)
}

/// A slot handed to a query.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub pool: Arc<str>,
    pub identity: Arc<str>,
    pub waited: Duration,
    /// This query is the half-open circuit probe.
    pub probe: bool,
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
    in_tx: bool,
    probe: bool,
}

/// Admission state of one upstream. `T` is what a waiter is woken with (a channel sender
/// in the async guard, a token in tests).
pub(crate) struct Core<T> {
    cfg: GuardConfig,
    active: usize,
    waiters: HashMap<u64, Waiter<T>>,
    next_id: u64,
    tx_queue: VecDeque<u64>,
    normal_queued: usize,
    idents: HashMap<Arc<str>, Ident>,
    /// Identities with at least one non-transaction waiter.
    backlogged: Vec<Arc<str>>,
    pools: HashMap<Arc<str>, Pool>,
    /// Since when the non-transaction queue has been continuously non-empty.
    nonempty_since: Option<Instant>,
    cohorts: Cohorts,
    breaker: Breaker,
    paused: bool,
    circuit_gauge: Gauge,
}

impl<T> Core<T> {
    pub(crate) fn new(cfg: GuardConfig, now: Instant) -> Self {
        let circuit_gauge =
            metrics::gauge!(names::CIRCUIT_STATE, "upstream" => cfg.upstream.clone());
        circuit_gauge.set(CircuitState::Closed.as_gauge());
        Core {
            cohorts: Cohorts::new(cfg.cohorts, cfg.cohort_rotation, now),
            breaker: Breaker::new(cfg.breaker.clone()),
            cfg,
            active: 0,
            waiters: HashMap::new(),
            next_id: 0,
            tx_queue: VecDeque::new(),
            normal_queued: 0,
            idents: HashMap::new(),
            backlogged: Vec::new(),
            pools: HashMap::new(),
            nonempty_since: None,
            paused: false,
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
        self.cfg.max_active
    }

    #[cfg(test)]
    pub(crate) fn next_id_for_tests(&self) -> u64 {
        self.next_id
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    /// A standing queue: for a whole CoDel interval the queue has not been empty and its
    /// oldest query has been waiting at least that long. A queue that is never empty but
    /// drains fast (closed-loop clients outnumbering the slots) is healthy and does not
    /// count; a burst that drains within the interval does not either.
    pub(crate) fn standing(&self, now: Instant) -> bool {
        if self.paused {
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
    fn under_pressure(&self, now: Instant) -> bool {
        if self.paused {
            return false;
        }
        let Some(since) = self.nonempty_since else {
            return false;
        };
        if now.saturating_duration_since(since) < self.cfg.codel_interval {
            return false;
        }
        self.oldest_normal()
            .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.codel_target)
    }

    /// Arrival time of the longest-waiting normal (not in-transaction) query.
    fn oldest_normal(&self) -> Option<Instant> {
        self.backlogged
            .iter()
            .filter_map(|n| self.idents.get(n)?.queue.front())
            .min()
            .and_then(|id| self.waiters.get(id))
            .map(|w| w.enqueued)
    }

    pub(crate) fn admit(
        &mut self,
        req: AdmitRequest,
        now: Instant,
        payload: impl FnOnce() -> T,
    ) -> Admission {
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
        let limit = self.cfg.max_active;
        if req.in_transaction {
            if self.active < limit && self.tx_queue.is_empty() {
                return Admission::Granted(self.grant_counts(
                    req.pool,
                    req.identity,
                    Duration::ZERO,
                    probe,
                ));
            }
        } else {
            let mid_request = req
                .last_admitted
                .is_some_and(|t| now.saturating_duration_since(t) <= self.cfg.mid_request_window);
            if !mid_request && !self.cohorts.allows(req.client_id, now) {
                return Admission::Shed(self.shed_arrival(&req, ShedReason::Cohort));
            }
            if !self.paused && self.active < limit && self.waiters.is_empty() {
                return Admission::Granted(self.grant_counts(
                    req.pool,
                    req.identity,
                    Duration::ZERO,
                    probe,
                ));
            }
            if self.normal_queued >= self.cfg.max_queue {
                return Admission::Shed(self.shed_arrival(&req, ShedReason::QueueFull));
            }
        }
        let mut expires = later(now, self.cfg.queue_timeout);
        if let Some(d) = req.deadline {
            expires = expires.min(d);
        }
        if expires <= now {
            let reason = if self.paused && !req.in_transaction {
                ShedReason::Paused
            } else {
                ShedReason::QueueTimeout
            };
            return Admission::Shed(self.shed_arrival(&req, reason));
        }
        let id = self.next_id;
        self.next_id += 1;
        let limit = self.cfg.max_active;
        let p = pool_entry(&mut self.pools, &req.pool, limit);
        p.queued += 1;
        p.m.queued.set(p.queued as f64);
        let ident = ident_entry(&mut self.idents, &req.identity, &self.cfg);
        if req.in_transaction {
            ident.tx_queued += 1;
            self.tx_queue.push_back(id);
        } else {
            if ident.queue.is_empty() {
                self.backlogged.push(req.identity.clone());
            }
            ident.queue.push_back(id);
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
            in_tx: req.in_transaction,
            probe,
        };
        let wake_at = self.wake_at(&w);
        self.waiters.insert(id, w);
        Admission::Queued { id, wake_at }
    }

    /// A granted query finished: free its slot and hand it on.
    pub(crate) fn release(&mut self, grant: &Grant, now: Instant, out: &mut Vec<Completion<T>>) {
        self.active = self.active.saturating_sub(1);
        if let Some(p) = self.pools.get_mut(&*grant.pool) {
            p.active = p.active.saturating_sub(1);
            p.m.active.set(p.active as f64);
        }
        if let Some(i) = self.idents.get_mut(&*grant.identity) {
            i.active = i.active.saturating_sub(1);
        }
        if grant.probe {
            // No verdict was reported for the probe: let another request probe.
            self.breaker.probe_abandoned();
        }
        self.dispatch(now, out);
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
        Some(self.wake_at(w))
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
    pub(crate) fn abandon(&mut self, id: u64) -> bool {
        match self.remove_waiter(id) {
            Some(w) => {
                if w.probe {
                    self.breaker.probe_abandoned();
                }
                true
            }
            None => false,
        }
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
        for (name, ident) in self.idents.iter_mut() {
            ident.weight = cfg.weight_of(name);
        }
        for p in self.pools.values() {
            p.m.limit.set(cfg.max_active as f64);
        }
        self.cohorts.reconfigure(cfg.cohorts, cfg.cohort_rotation);
        self.breaker.set_config(cfg.breaker.clone());
        self.cfg = cfg;
        self.dispatch(now, out);
    }

    /// Hand free slots to waiters: open transactions first, then the backlogged identity
    /// with the smallest active/weight, FIFO within it (LIFO while the queue stands).
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Completion<T>>) {
        // Each pass removes one waiter, so this ends.
        while self.active < self.cfg.max_active {
            let id = if let Some(&id) = self.tx_queue.front() {
                id
            } else if self.paused || self.normal_queued == 0 {
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
            if let Some(reason) = self.due_reason(w, now) {
                self.shed_waiter(id, reason, now, out);
                continue;
            }
            if let Some(w) = self.remove_waiter(id) {
                let waited = now.saturating_duration_since(w.enqueued);
                let grant = self.grant_counts(w.pool, w.identity, waited, w.probe);
                out.push(Completion {
                    id,
                    payload: w.payload,
                    outcome: Ok(grant),
                });
            }
        }
    }

    fn pick_normal(&self, now: Instant) -> Option<u64> {
        fair::pick(&self.backlogged, &self.idents, self.standing(now))
    }

    fn due_reason(&self, w: &Waiter<T>, now: Instant) -> Option<ShedReason> {
        if now >= w.expires {
            return Some(if self.paused && !w.in_tx {
                ShedReason::Paused
            } else {
                ShedReason::QueueTimeout
            });
        }
        if !w.in_tx
            && self.standing(now)
            && now.saturating_duration_since(w.enqueued) >= self.cfg.codel_target
        {
            return Some(ShedReason::StandingQueue);
        }
        None
    }

    fn wake_at(&self, w: &Waiter<T>) -> Instant {
        match self.nonempty_since {
            Some(since) if !w.in_tx && !self.paused => {
                // Standing from when both the queue and its oldest waiter are an interval old.
                let oldest = self.oldest_normal().unwrap_or(w.enqueued);
                let codel = later(since.max(oldest), self.cfg.codel_interval)
                    .max(later(w.enqueued, self.cfg.codel_target));
                codel.min(w.expires)
            }
            _ => w.expires,
        }
    }

    fn remove_waiter(&mut self, id: u64) -> Option<Waiter<T>> {
        let w = self.waiters.remove(&id)?;
        if let Some(p) = self.pools.get_mut(&*w.pool) {
            p.queued = p.queued.saturating_sub(1);
            p.m.queued.set(p.queued as f64);
        }
        if w.in_tx {
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
            self.normal_queued = self.normal_queued.saturating_sub(1);
            if self.normal_queued == 0 {
                self.nonempty_since = None;
            }
        }
        Some(w)
    }

    fn grant_counts(
        &mut self,
        pool: Arc<str>,
        identity: Arc<str>,
        waited: Duration,
        probe: bool,
    ) -> Grant {
        self.active += 1;
        let p = pool_entry(&mut self.pools, &pool, self.cfg.max_active);
        p.active += 1;
        p.m.active.set(p.active as f64);
        p.m.wait.record(waited.as_secs_f64());
        let i = ident_entry(&mut self.idents, &identity, &self.cfg);
        i.active += 1;
        i.admitted_total += 1;
        Grant {
            pool,
            identity,
            waited,
            probe,
        }
    }

    fn shed_waiter(
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
            let waited = now.saturating_duration_since(w.enqueued);
            let shed = self.count_shed(&w.pool, &w.identity, reason, waited);
            out.push(Completion {
                id,
                payload: w.payload,
                outcome: Err(shed),
            });
        }
    }

    fn shed_arrival(&mut self, req: &AdmitRequest, reason: ShedReason) -> Shed {
        self.count_shed(&req.pool, &req.identity, reason, Duration::ZERO)
    }

    fn count_shed(
        &mut self,
        pool: &Arc<str>,
        identity: &Arc<str>,
        reason: ShedReason,
        waited: Duration,
    ) -> Shed {
        let p = pool_entry(&mut self.pools, pool, self.cfg.max_active);
        p.m.shed[reason.index()].increment(1);
        p.m.wait.record(waited.as_secs_f64());
        ident_entry(&mut self.idents, identity, &self.cfg).shed_total += 1;
        Shed {
            reason,
            waited,
            active: self.active,
            limit: self.cfg.max_active,
            queued: self.waiters.len(),
        }
    }

    pub(crate) fn snapshot(&mut self, now: Instant) -> GuardSnapshot {
        let circuit = self.sync_circuit_gauge(now);
        let pools = self
            .pools
            .iter()
            .map(|(k, p)| {
                let s = PoolSnapshot {
                    active: p.active,
                    queued: p.queued,
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
            limit: self.cfg.max_active,
            queued: self.waiters.len(),
            paused: self.paused,
            circuit,
            standing_queue: self.standing(now),
            admitted_cohorts: self.cohorts.admitted(),
            cohorts: self.cohorts.count(),
            pools,
            identities,
        }
    }
}
