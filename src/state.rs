//! State every session and background task shares: configuration (and its reload), users,
//! TLS, the guard, the pools, the cancel registry and the counters the admin side reads.
//! Sessions, the console and the admin API depend on this module; `server` builds it.

use crate::auth::UserStore;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::guard::{BreakerConfig, Guard, GuardConfig, Shed};
use crate::metrics as m;
use crate::pool::{PoolEntry, PoolRegistry};
use crate::tls::upstream::UpstreamTls;
use crate::tls::ClientTls;
use crate::upstream::Topology;
use anyhow::Result;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

const NEVER: u64 = u64::MAX;

/// State every session and background task shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    config_generation: AtomicU64,
    users: RwLock<Arc<UserStore>>,
    /// Client-side TLS; replaced on reload, so new connections get new certificates.
    client_tls: RwLock<Option<Arc<ClientTls>>>,
    pub guard: Arc<Guard>,
    pub pools: PoolRegistry,
    pub cancels: Arc<CancelRegistry>,
    pub clients_total: AtomicUsize,
    pub clients_waiting: AtomicUsize,
    pub clients_active: AtomicUsize,
    next_client: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Set by the console's SHUTDOWN; the process then stops as on SIGTERM.
    stop: tokio::sync::Notify,
    pub upstream_up: AtomicBool,
    started: Instant,
    /// Milliseconds since start of the last shed log line (rate limit); `NEVER` before the
    /// first one, so a shed right after start is logged too.
    last_shed_log: AtomicU64,
    suppressed_sheds: AtomicU64,
    /// Bounds the identity label's values; fixed at start (not changed by reload).
    identity_labels: m::LabelCap,
}

pub fn guard_config(cfg: &Config) -> GuardConfig {
    GuardConfig {
        upstream: cfg.upstream.label(),
        max_active: cfg.max_active,
        adaptive: cfg
            .adaptive
            .map(|(min, max)| crate::guard::AdaptiveConfig { min, max }),
        max_queue: cfg.max_queue,
        queue_timeout: cfg.queue_timeout,
        // Off: an interval no queue outlasts (the queue timeout ends every wait first).
        codel_interval: cfg
            .codel_interval
            .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
        codel_target: cfg.codel_target,
        shares: cfg.shares.clone(),
        breaker: BreakerConfig {
            failure_threshold: cfg.breaker_threshold,
            base_cooldown: cfg.breaker_cooldown,
            max_cooldown: cfg.breaker_max_cooldown,
        },
        pools: pool_limits(cfg),
        ..Default::default()
    }
}

/// A reload never changes a `[databases]` / `[users]` pool mode (see `Shared::apply`).
fn keep_pool_modes(
    kind: &str,
    new: &mut HashMap<String, crate::config::DatabaseSettings>,
    old: &HashMap<String, crate::config::DatabaseSettings>,
) {
    let names: std::collections::BTreeSet<String> = new.keys().chain(old.keys()).cloned().collect();
    for name in names {
        let was = old.get(&name).and_then(|d| d.pool_mode);
        if new.get(&name).and_then(|d| d.pool_mode) != was {
            warn!("[{kind}.{name}] pool-mode changes need a restart; keeping the old value");
            new.entry(name).or_default().pool_mode = was;
        }
    }
}

/// `[databases]` and `[users]` bounds as the guard applies them per pool.
fn pool_limits(cfg: &Config) -> crate::guard::PoolLimitTable {
    let limits = |m: &HashMap<String, crate::config::DatabaseSettings>| {
        m.iter()
            .map(|(k, d)| {
                let l = crate::guard::PoolLimits {
                    max_active: d.max_active_cap(),
                    max_queue: d.max_queue,
                    queue_timeout: d.queue_timeout,
                    share: d.share,
                };
                (k.clone(), l)
            })
            .collect()
    };
    crate::guard::PoolLimitTable {
        databases: limits(&cfg.databases),
        users: limits(&cfg.user_settings),
    }
}

pub(crate) fn load_users(cfg: &Config) -> Result<Arc<UserStore>> {
    Ok(Arc::new(match &cfg.users {
        Some(p) => UserStore::load(p).map_err(anyhow::Error::msg)?,
        None => UserStore::empty(),
    }))
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::Relaxed)
    }

    pub fn users(&self) -> Arc<UserStore> {
        self.users.read().clone()
    }

    pub fn client_tls(&self) -> Option<Arc<ClientTls>> {
        self.client_tls.read().clone()
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    pub fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells sessions the proxy is shutting down (they finish their transactions).
    pub(crate) fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Asks the process to stop gracefully (the admin console's SHUTDOWN).
    pub fn request_stop(&self) {
        self.stop.notify_one();
    }

    /// Resolves once [`Shared::request_stop`] was called.
    pub async fn stop_requested(&self) {
        self.stop.notified().await
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Re-reads the configuration file; an invalid one leaves everything as it was.
    /// Every attempt (SIGHUP or POST /reload) is counted by outcome.
    pub fn reload(&self) -> Result<(), String> {
        let res = self.reload_inner();
        let outcome = if res.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "outcome" => outcome).increment(1);
        res
    }

    fn reload_inner(&self) -> Result<(), String> {
        let new = self.config().reload().map_err(|e| e.to_string())?;
        self.apply(new)?;
        info!("configuration reloaded");
        Ok(())
    }

    /// The console's `SET key = value`: the setting as if given as a flag (it outranks the
    /// file and survives RELOAD until restart), applied the way a reload applies a file.
    pub fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let new = self
            .config()
            .with_setting(key, value)
            .map_err(|e| e.to_string())?;
        self.apply(new)
    }

    /// Installs a validated configuration; settings that need a restart keep their values.
    fn apply(&self, mut new: Config) -> Result<(), String> {
        let old = self.config();
        let users = load_users(&new).map_err(|e| e.to_string())?;
        // Certificates are re-read even when the file names did not change; an unreadable
        // or mismatched one rejects the reload and the running ones stay.
        let tls = ClientTls::load(&new)?;
        if new.listen != old.listen
            || new.admin_listen != old.admin_listen
            || new.upstream != old.upstream
        {
            warn!(
                "listen, admin-listen and upstream changes need a restart; keeping the old values"
            );
            new.listen = old.listen;
            new.admin_listen = old.admin_listen;
            new.upstream = old.upstream.clone();
        }
        // Sessions pick up a new configuration between queries: a mode switch would turn
        // a session-mode client's server (with its session state) into a shared one.
        if new.threads != old.threads {
            warn!("threads changes need a restart; keeping the old value");
            new.threads = old.threads;
        }
        // The role checks and the lag bound are fixed when the upstream's hosts are set up.
        if new.host_check_interval != old.host_check_interval
            || new.max_replica_lag != old.max_replica_lag
        {
            warn!("host-check-interval and max-replica-lag changes need a restart; keeping the old values");
            new.host_check_interval = old.host_check_interval;
            new.max_replica_lag = old.max_replica_lag;
        }
        if new.pool_mode != old.pool_mode {
            warn!("pool-mode changes need a restart; keeping the old value");
            new.pool_mode = old.pool_mode;
        }
        keep_pool_modes("databases", &mut new.databases, &old.databases);
        keep_pool_modes("users", &mut new.user_settings, &old.user_settings);
        new.generation = old.generation + 1;
        self.guard.update_config(guard_config(&new));
        self.pools.update(&new, users.clone());
        *self.users.write() = users;
        *self.client_tls.write() = tls;
        *self.config.write() = Arc::new(new);
        self.config_generation.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn count_query(&self, pool: &PoolEntry, outcome: &'static str) {
        pool.metrics.queries(outcome).increment(1);
        if outcome == "shed" {
            pool.stats.shed();
        }
    }

    pub fn observe_query(&self, pool: &PoolEntry, outcome: &'static str, took: Duration) {
        pool.metrics.queries(outcome).increment(1);
        pool.metrics.duration.record(took.as_secs_f64());
    }

    pub fn count_cancel(&self, pool: &PoolEntry, cause: &'static str) {
        pool.stats.cancel();
        metrics::counter!(m::CANCELS_TOTAL, "pool" => pool.label.to_string(), "cause" => cause)
            .increment(1);
    }

    /// New queries wait (and in time are refused) until [`Shared::resume`].
    pub fn pause(&self) {
        self.guard.pause();
        metrics::gauge!(m::PAUSED).set(1.0);
    }

    /// Resumes the proxy and every database paused on its own.
    pub fn resume(&self) {
        self.guard.resume_database(None);
        metrics::gauge!(m::PAUSED).set(0.0);
    }

    /// A client-facing database name with a pool or a `[databases]` entry.
    pub fn knows_database(&self, database: &str) -> bool {
        self.config().databases.contains_key(database)
            || self.pools.all().iter().any(|p| p.database == database)
    }

    /// `KILL db`, the immediate part: the database is paused (new queries and logins
    /// wait for RESUME) and each of its sessions is told to end. Returns how many.
    pub fn kill_database(&self, database: &str) -> usize {
        self.guard.pause_database(database);
        self.cancels.kill_database(database)
    }

    /// `KILL db`, the rest: closes the database's idle server connections and waits
    /// (at most `limit`) for the killed sessions to close theirs. Returns how many are
    /// still open.
    pub async fn close_database_servers(&self, database: &str, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let pools: Vec<_> = self
                .pools
                .all()
                .into_iter()
                .filter(|p| p.database == database)
                .collect();
            for p in &pools {
                p.close_idle().await;
            }
            let open: usize = pools
                .iter()
                .map(|p| p.pool.state().connections as usize)
                .sum();
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Counts a shed per identity and logs it at most once a second, with how many were
    /// folded into the logged line.
    pub fn log_shed(&self, identity: &str, shed: &Shed) {
        metrics::counter!(
            m::IDENTITY_SHED_TOTAL,
            "identity" => self.identity_labels.label(identity).to_string(),
            "reason" => shed.reason.as_str()
        )
        .increment(1);
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_shed_log.load(Ordering::Relaxed);
        if (last == NEVER || now.saturating_sub(last) >= 1000)
            && self
                .last_shed_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let folded = self.suppressed_sheds.swap(0, Ordering::Relaxed);
            warn!(
                identity,
                reason = shed.reason.as_str(),
                active = shed.active,
                limit = shed.limit,
                queued = shed.queued,
                waited_ms = shed.waited.as_millis() as u64,
                also_shed = folded,
                "query shed"
            );
        } else {
            self.suppressed_sheds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Samples the connection gauges (also at every scrape, so a new pool's series show at
    /// once instead of after the next health check).
    pub(crate) fn export_gauges(&self) {
        let total = self.clients_total.load(Ordering::Relaxed);
        let waiting = self.clients_waiting.load(Ordering::Relaxed);
        let active = self.clients_active.load(Ordering::Relaxed);
        metrics::gauge!(m::CLIENT_CONNECTIONS, "state" => "active").set(active as f64);
        metrics::gauge!(m::CLIENT_CONNECTIONS, "state" => "waiting").set(waiting as f64);
        metrics::gauge!(m::CLIENT_CONNECTIONS, "state" => "idle")
            .set(total.saturating_sub(active + waiting) as f64);
        self.pools.export_gauges();
        let up = self.config().upstream.label();
        metrics::gauge!(m::UPSTREAM_UP, "upstream" => up.clone()).set(
            if self.upstream_up.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        metrics::gauge!(m::CIRCUIT_STATE, "upstream" => up)
            .set(self.guard.circuit_state().as_gauge());
        metrics::gauge!(m::PAUSED).set(if self.guard.is_paused() { 1.0 } else { 0.0 });
    }
}

impl Shared {
    /// Everything a running proxy shares, from a validated configuration.
    pub(crate) fn new(
        cfg: Config,
        users: Arc<UserStore>,
        client_tls: Option<Arc<ClientTls>>,
        upstream_tls: Arc<UpstreamTls>,
        guard: Arc<Guard>,
        shutdown: watch::Sender<bool>,
    ) -> Shared {
        let identity_labels = m::LabelCap::new(cfg.identity_label_cap);
        Shared {
            pools: PoolRegistry::new(
                &cfg,
                guard.clone(),
                users.clone(),
                upstream_tls,
                Topology::new(&cfg.upstream, cfg.max_replica_lag),
            ),
            config: RwLock::new(Arc::new(cfg)),
            config_generation: AtomicU64::new(0),
            users: RwLock::new(users),
            client_tls: RwLock::new(client_tls),
            guard,
            cancels: Arc::new(CancelRegistry::new()),
            clients_total: AtomicUsize::new(0),
            clients_waiting: AtomicUsize::new(0),
            clients_active: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            shutdown,
            stop: tokio::sync::Notify::new(),
            upstream_up: AtomicBool::new(false),
            started: Instant::now(),
            last_shed_log: AtomicU64::new(NEVER),
            suppressed_sheds: AtomicU64::new(0),
            identity_labels,
        }
    }
}
