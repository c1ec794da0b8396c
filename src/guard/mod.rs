//! Admission control for one upstream: how many queries run at once, who waits, who is
//! refused, and when the upstream is left alone (see DESIGN.md, "Guard semantics").
//!
//! # Queue discipline
//!
//! A query holds a *slot* from the moment it is sent upstream until its ReadyForQuery comes
//! back; at most `max_active` slots are held per upstream, across all of its pools. A query
//! that finds a free slot and nobody eligible waiting runs at once; otherwise it waits.
//!
//! Waiters sit in two tiers. Statements of an already-open transaction wait in their own
//! FIFO and are served before everything else: they hold locks and a server connection, and
//! starving them would stall the whole pool. They also pass a pause (so open transactions
//! can finish) and are exempt from the length bound and from cohort and standing-queue
//! shedding, because refusing one would abort the transaction (their number is bounded
//! anyway: each holds a server connection). All other queries wait in one FIFO per client
//! identity. When a slot frees, it goes to the backlogged identity with the smallest
//! `active / weight` (weights from `--share`, default 1), ties to the longest-waiting head.
//! Weights only matter while every slot is taken: an identity alone on an idle database may
//! use all of it.
//!
//! The queue is bounded in length (`max_queue`: beyond it new queries are refused at once)
//! and in time (`queue_timeout`, cut short by the client's own deadline). On top of that
//! runs CoDel with adaptive LIFO: if the queue has not been empty for a whole
//! `codel_interval`, it is a standing queue, not a burst. While it stands, waiters older
//! than `codel_target` are refused and freed slots go to the newest waiters of the chosen
//! identity, who still have time left to make use of them; the moment the queue empties,
//! service returns to FIFO. A short burst that drains within the interval is absorbed
//! whole, in order. So under sustained overload a query waits about `max(codel_interval,
//! codel_target)` at most (100 ms by default) while clients are abandoning work (the
//! waste gate below); `queue_timeout` bounds waits in bursts, in stable queues and during a
//! pause.
//!
//! Under sustained overload the guard sheds requests rather than individual queries. An
//! application request is usually several queries in a row on one connection; refusing the
//! third query wastes the first two. Clients hash into `cohorts` buckets whose priority
//! order rotates every `cohort_rotation`. An overload level sets how many buckets take new
//! work: it drops by one bucket per CoDel interval while the queue is under pressure (not
//! emptied for an interval, oldest waiter past `codel_target`; never below one)
//! and climbs back by one per interval otherwise. A client outside the admitted buckets is
//! refused at once (`cohort`), so the same clients are turned away consistently and
//! cheaply, while a client that had a query admitted within `mid_request_window` bypasses
//! the filter and can finish what it started. The rotation spreads the refusals fairly over
//! time.
//!
//! A query of a client that holds no server connection also needs a connection *lease* of
//! its pool (at most `--pool-size` per pool), granted together with the slot: nobody ever
//! holds a slot while waiting for a connection, so a client inside a transaction (which holds
//! its connection and needs only slots) always finishes. Logins wait for a lease alone.
//! Standing-queue and cohort shedding apply only while work is being wasted (a client gave
//! up on queued or running work within the last ten intervals, or a waiter timed out) and
//! only to waiters held back by the database itself (all slots, or all of the pool's
//! connections, running queries). See docs/DESIGN.md, "Slots and connections".
//!
//! A pool may have bounds of its own (`[databases.NAME]` / `[users.NAME]`, told to the core
//! by `register_pool` and re-read on reload): a cap on its running queries under the
//! upstream's limit (a query then needs a free slot of both; a waiter held back by its pool's
//! cap counts as held back by the database), a bound on its waiting queries next to
//! `max_queue`, and a queue timeout instead of `queue_timeout`. A database can be paused on
//! its own (`PAUSE db`, `KILL db`) with the same rules as a pause of everything; pools of
//! that database made later start paused.
//!
//! A waiter whose client goes away leaves the queue at once; if a slot was granted to it in
//! that instant, the slot is released and handed on. A circuit breaker stops all of this
//! while the upstream is failing: after `failure_threshold` consecutive failures every
//! waiter and every new query is refused (`circuit_open`) until a cool-down passes
//! (doubling on each re-open up to `max_cooldown`); then one probe query is let through;
//! its success closes the circuit and resets the cool-down, its failure re-opens it for
//! twice as long. If the probe ends without a verdict, the next query probes instead. A
//! pause holds new queries in the queue (refused as `paused` if it outlasts their timeout)
//! while running ones finish.

mod breaker;
mod cohort;
mod config;
mod core;
mod fair;
mod limiter;
mod pools;
mod snapshot;
mod types;

#[cfg(test)]
mod tests_async;
#[cfg(test)]
mod tests_core;
#[cfg(test)]
mod tests_lease;
#[cfg(test)]
mod tests_limiter;
#[cfg(test)]
mod tests_pools;
#[cfg(test)]
mod tests_prop;

/// The guard's maps are looked up for every queued waiter on every release; SipHash showed
/// in profiles. foldhash is seeded per process, so keys chosen by clients still spread.
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use self::config::{AdaptiveConfig, BreakerConfig, GuardConfig, PoolLimitTable, PoolLimits};
pub use self::snapshot::{GuardSnapshot, IdentitySnapshot, PoolSnapshot};
pub use self::types::{AdmitRequest, CircuitState, Shed, ShedReason};

use self::core::{Admission, Completion, Core, Grant};

type Reply = oneshot::Sender<Result<Permit, Shed>>;

/// Clock of the guard: tokio's, so paused-time tests drive it; the real clock otherwise.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Admission control for one upstream, shared by all its sessions.
pub struct Guard {
    core: Mutex<Core<Reply>>,
    me: Weak<Guard>,
    /// The breaker is closed with no failure counted, so a success changes nothing: the
    /// common case skips the lock (a success is reported after every query). Written only
    /// under the lock.
    clean: AtomicBool,
}

impl Guard {
    pub fn new(cfg: GuardConfig) -> Arc<Guard> {
        let core = Core::new(cfg, now());
        Arc::new_cyclic(|me| Guard {
            core: Mutex::new(core),
            me: me.clone(),
            clean: AtomicBool::new(true),
        })
    }

    /// Wait for a slot. Dropping the future leaves the queue; a slot granted in the same
    /// instant is given back.
    pub async fn admit(self: &Arc<Self>, req: AdmitRequest) -> Result<Permit, Shed> {
        let mut rx = None;
        let admission = self.core.lock().admit(req, now(), || {
            let (tx, r) = oneshot::channel();
            rx = Some(r);
            tx
        });
        let (id, mut wake_at) = match admission {
            Admission::Granted(grant) => return Ok(Permit::new(self.clone(), grant)),
            Admission::Shed(shed) => return Err(shed),
            Admission::Queued { id, wake_at } => (id, wake_at),
        };
        let mut waiting = Waiting {
            guard: self,
            id,
            armed: true,
        };
        let Some(mut rx) = rx else {
            // The core always builds the reply channel for a queued waiter.
            return Err(self.lost_reply());
        };
        let outcome = loop {
            tokio::select! {
                biased;
                r = &mut rx => break r,
                _ = tokio::time::sleep_until(wake_at.into()) => {
                    let mut out = Vec::new();
                    let next = self.core.lock().check(id, now(), &mut out);
                    self.deliver(out);
                    match next {
                        Some(t) => wake_at = t,
                        // Settled by now: its outcome is in (or on its way to) the channel.
                        None => break (&mut rx).await,
                    }
                }
            }
        };
        waiting.armed = false;
        outcome.unwrap_or_else(|_| Err(self.lost_reply()))
    }

    /// Apply new settings without dropping anyone.
    pub fn update_config(&self, cfg: GuardConfig) {
        let mut out = Vec::new();
        self.core.lock().update_config(cfg, now(), &mut out);
        self.deliver(out);
    }

    pub fn pause(&self) {
        self.core.lock().pause();
    }

    pub fn resume(&self) {
        let mut out = Vec::new();
        self.core.lock().resume(now(), &mut out);
        self.deliver(out);
    }

    pub fn is_paused(&self) -> bool {
        self.core.lock().is_paused()
    }

    /// Holds new queries and logins of one database's pools (see `pause`).
    pub fn pause_database(&self, database: &str) {
        self.core.lock().pause_database(database);
    }

    /// Resumes one database, or (None) the whole proxy and every paused database.
    pub fn resume_database(&self, database: Option<&str>) {
        let mut out = Vec::new();
        self.core.lock().resume_database(database, now(), &mut out);
        self.deliver(out);
    }

    pub fn is_database_paused(&self, database: &str) -> bool {
        self.core.lock().is_database_paused(database)
    }

    /// Databases paused on their own, sorted.
    pub fn paused_databases(&self) -> Vec<String> {
        self.core.lock().paused_databases()
    }

    /// Names the database and user of pool `label`: it gets their bounds
    /// (`GuardConfig::pools`) and its database's pause.
    pub fn register_pool(&self, label: &Arc<str>, database: &str, user: &str) {
        self.core.lock().register_pool(label, database, user);
    }

    /// The upstream answered (connect or query): closes a half-open circuit.
    pub fn record_success(&self) {
        if self.clean.load(Ordering::Acquire) {
            return;
        }
        let mut core = self.core.lock();
        core.record_success(now());
        self.clean.store(core.breaker_clean(), Ordering::Release);
    }

    /// A new primary took over (several upstream hosts): the failures that opened the
    /// breaker were the old server's, so queries go to the new one at once.
    pub fn reset_breaker(&self) {
        let mut core = self.core.lock();
        core.reset_breaker(now());
        self.clean.store(core.breaker_clean(), Ordering::Release);
    }

    /// Work was wasted outside the queue: a client left, or hit its timeout, with its
    /// query running. Enables standing-queue shedding for a while (see `Core::wasting`).
    pub fn record_waste(&self) {
        self.core.lock().record_waste(now());
    }

    /// The upstream failed (connect failure, lost connection, timeout).
    pub fn record_failure(&self) {
        let mut out = Vec::new();
        {
            let mut core = self.core.lock();
            core.record_failure(now(), &mut out);
            self.clean.store(core.breaker_clean(), Ordering::Release);
        }
        self.deliver(out);
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.core.lock().circuit_state(now())
    }

    pub fn snapshot(&self) -> GuardSnapshot {
        self.core.lock().snapshot(now())
    }

    /// Hand outcomes to their waiters; call with the lock released, since a permit whose
    /// waiter is gone is dropped here and releases its slot.
    fn deliver(&self, out: Vec<Completion<Reply>>) {
        if out.is_empty() {
            return;
        }
        let me = self.me.upgrade();
        for c in out {
            let msg = match (c.outcome, &me) {
                (Ok(grant), Some(me)) => Ok(Permit::new(me.clone(), grant)),
                (Ok(grant), None) => {
                    // The guard is being torn down: nobody can hold the slot.
                    let _ = grant;
                    continue;
                }
                (Err(shed), _) => Err(shed),
            };
            let _ = c.payload.send(msg);
        }
    }

    fn lost_reply(&self) -> Shed {
        let core = self.core.lock();
        Shed {
            reason: ShedReason::QueueTimeout,
            waited: Duration::ZERO,
            active: core.active(),
            limit: core.limit(),
            queued: core.queued(),
        }
    }

    fn release(&self, grant: &Grant) {
        let mut out = Vec::new();
        self.core.lock().release(grant, now(), &mut out);
        self.deliver(out);
    }

    fn release_lease(&self, pool: &str) {
        let mut out = Vec::new();
        self.core.lock().release_lease(pool, now(), &mut out);
        self.deliver(out);
    }
}

/// Removes the waiter if the admit future is dropped while queued.
struct Waiting<'a> {
    guard: &'a Guard,
    id: u64,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.guard.core.lock().abandon(self.id, now());
        }
    }
}

/// A held slot; dropping it frees the slot for the next waiter.
pub struct Permit {
    guard: Arc<Guard>,
    grant: Grant,
}

impl Permit {
    fn new(guard: Arc<Guard>, grant: Grant) -> Self {
        Permit { guard, grant }
    }

    /// The query completed (its ReadyForQuery came back) after running this long: the
    /// adaptive limit learns from it when the slot is released.
    pub fn completed(&mut self, running: Duration) {
        self.grant.set_running(running);
    }

    /// Time spent queued before the slot was granted.
    pub fn waited(&self) -> Duration {
        self.grant.waited()
    }

    pub fn pool(&self) -> &str {
        &self.grant.pool
    }

    pub fn identity(&self) -> &str {
        &self.grant.identity
    }

    /// This query is the half-open circuit probe: report its result with
    /// `record_success` / `record_failure`.
    pub fn is_probe(&self) -> bool {
        self.grant.probe
    }

    /// Takes the server-connection lease granted with this slot (asked for with
    /// `AdmitRequest::lease`), to be held as long as the connection is.
    pub fn take_lease(&mut self) -> Option<Lease> {
        if !self.grant.lease {
            return None;
        }
        self.grant.lease = false;
        Some(Lease {
            guard: self.guard.clone(),
            pool: self.grant.pool.clone(),
            held: true,
        })
    }

    /// Gives `lease` back with this slot, so that dropping the permit frees both under one
    /// lock. The lease's connection must already be back in the pool.
    pub fn return_lease(&mut self, mut lease: Lease) {
        if lease.held && Arc::ptr_eq(&lease.guard, &self.guard) && lease.pool == self.grant.pool {
            lease.held = false;
            self.grant.lease = true;
        }
    }
}

/// The right to hold one server connection of a pool; dropping it lets the next session
/// (or login) waiting for one of that pool's connections in. Drop it only after the
/// connection is back in the pool, so a granted lease always finds a connection free.
pub struct Lease {
    guard: Arc<Guard>,
    pool: Arc<str>,
    /// False once handed back to a permit (`Permit::return_lease`).
    held: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.held {
            self.guard.release_lease(&self.pool);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("pool", &self.pool).finish()
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("pool", &self.grant.pool)
            .field("identity", &self.grant.identity)
            .field("waited", &self.grant.waited())
            .field("probe", &self.grant.probe)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.guard.release(&self.grant);
    }
}
