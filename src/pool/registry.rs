//! The pools of one upstream by (database, user), made on first use with the settings of
//! the moment (`[databases]`, `[users]`, flags).

use super::{
    auth_query, ConnectFailures, PoolEntry, PoolMetrics, PoolStats, ServerList, ServerManager,
};
use crate::auth::upstream::Credentials;
use crate::auth::UserStore;
use crate::config::{Config, DatabaseSettings, PoolMode, Upstream};
use crate::guard::Guard;
use crate::metrics as m;
use crate::tls::upstream::UpstreamTls;
use crate::upstream::{Route, Topology};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// All pools of one upstream, created on first use.
pub struct PoolRegistry {
    pools: Mutex<HashMap<(String, String), Arc<PoolEntry>>>,
    settings: RwLock<PoolSettings>,
    upstream: Upstream,
    topology: Arc<Topology>,
    tls: Arc<UpstreamTls>,
    guard: Arc<Guard>,
    /// Users file: plain passwords there are used to log in upstream as that user.
    users: RwLock<Arc<UserStore>>,
    /// Looks up users missing from the users file (`--auth-user`); fixed at start.
    pub auth_query: Option<auth_query::AuthQuery>,
}

#[derive(Clone, Debug)]
struct PoolSettings {
    size: usize,
    lifetime: Option<Duration>,
    idle_timeout: Option<Duration>,
    connect_timeout: Duration,
    pool_mode: PoolMode,
    databases: HashMap<String, DatabaseSettings>,
    users: HashMap<String, DatabaseSettings>,
}

impl PoolSettings {
    fn from(cfg: &Config) -> Self {
        PoolSettings {
            size: cfg.pool_size,
            lifetime: cfg.server_lifetime,
            idle_timeout: cfg.server_idle_timeout,
            connect_timeout: cfg.connect_timeout,
            pool_mode: cfg.pool_mode,
            databases: cfg.databases.clone(),
            users: cfg.user_settings.clone(),
        }
    }
}

impl PoolRegistry {
    pub fn new(
        cfg: &Config,
        guard: Arc<Guard>,
        users: Arc<UserStore>,
        tls: Arc<UpstreamTls>,
        topology: Arc<Topology>,
    ) -> Self {
        let auth_query = cfg.auth_user.as_ref().map(|u| {
            let aq = auth_query::AuthQueryConfig {
                user: u.clone(),
                creds: configured_credentials(&users, &cfg.upstream, u),
                query: cfg.auth_query.clone(),
                dbname: cfg.auth_dbname.clone(),
                ttl: cfg.auth_cache_ttl,
                timeout: cfg.connect_timeout,
            };
            auth_query::AuthQuery::new(aq, cfg.upstream.clone(), topology.clone(), tls.clone())
        });
        PoolRegistry {
            tls,
            pools: Mutex::new(HashMap::new()),
            settings: RwLock::new(PoolSettings::from(cfg)),
            upstream: cfg.upstream.clone(),
            topology,
            guard,
            users: RwLock::new(users),
            auth_query,
        }
    }

    /// Applies new settings to pools created from now on (bb8 pools cannot be resized in
    /// place; existing ones keep their size until the proxy restarts).
    pub fn update(&self, cfg: &Config, users: Arc<UserStore>) {
        *self.settings.write() = PoolSettings::from(cfg);
        *self.users.write() = users;
    }

    /// The upstream database a client-facing name stands for (`[databases.NAME] dbname`;
    /// `NAME@ro` stands for what NAME does, read on a standby).
    pub fn upstream_dbname(&self, database: &str) -> String {
        let (database, _) = Route::of_database(database);
        let s = self.settings.read();
        let alias = s.databases.get(database).and_then(|d| d.dbname.clone());
        alias.unwrap_or_else(|| database.to_string())
    }

    pub fn get_or_create(&self, database: &str, user: &str) -> Arc<PoolEntry> {
        let key = (database.to_string(), user.to_string());
        if let Some(p) = self.pools.lock().get(&key) {
            return p.clone();
        }
        let mut s = self.settings.read().clone();
        // The key keeps the suffix: reads on standbys are a pool of their own.
        let (base, route) = Route::of_database(database);
        let db = s.databases.get(base);
        let upstream_database = db
            .and_then(|d| d.dbname.clone())
            .unwrap_or_else(|| base.to_string());
        let own = crate::config::resolve_pool_settings(&s.databases, &s.users, base, user);
        if let Some(n) = own.pool_size {
            s.size = n;
        }
        // Fixed for the pool's life: a session-mode server (with its session state) must
        // never become a shared one.
        let mode = own.pool_mode.unwrap_or(s.pool_mode);
        let creds = configured_credentials(&self.users.read(), &self.upstream, user);
        let creds = Arc::new(RwLock::new(creds));
        let label: Arc<str> = format!("{database}/{user}").into();
        let params = Arc::new(RwLock::new(Vec::new()));
        let failures = Arc::new(ConnectFailures::default());
        let servers = Arc::new(ServerList::default());
        let manager = ServerManager {
            failures: failures.clone(),
            servers: servers.clone(),
            upstream: self.upstream.clone(),
            topology: self.topology.clone(),
            route,
            no_host: Default::default(),
            tls: self.tls.clone(),
            user: user.to_string(),
            database: upstream_database.clone(),
            creds: creds.clone(),
            connect_timeout: s.connect_timeout,
            lifetime: s.lifetime,
            guard: self.guard.clone(),
            label: label.clone(),
            params: params.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(s.size as u32)
            .min_idle(None)
            .test_on_check_out(true)
            .retry_connection(false)
            .max_lifetime(s.lifetime)
            .idle_timeout(s.idle_timeout)
            .connection_timeout(Duration::from_secs(3600))
            .reaper_rate(Duration::from_secs(5))
            .build_unchecked(manager.clone());
        let entry = Arc::new(PoolEntry {
            failures,
            metrics: PoolMetrics::new(&label),
            pool,
            label,
            database: database.to_string(),
            upstream_database,
            user: user.to_string(),
            capacity: s.size,
            mode,
            route,
            stats: PoolStats::default(),
            servers,
            creds,
            params,
            manager,
        });
        let mut pools = self.pools.lock();
        let entry = pools.entry(key).or_insert(entry).clone();
        // Under the pools lock, so the guard learns each pool once, with its names.
        self.guard
            .register_pool(&entry.label, &entry.database, &entry.user);
        entry
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// How server connections are secured (shared with the health check).
    pub fn tls(&self) -> &Arc<UpstreamTls> {
        &self.tls
    }

    pub fn all(&self) -> Vec<Arc<PoolEntry>> {
        self.pools.lock().values().cloned().collect()
    }

    /// Publishes per-pool server connection gauges.
    pub fn export_gauges(&self) {
        for p in self.all() {
            let st = p.pool.state();
            let active = st.connections.saturating_sub(st.idle_connections);
            metrics::gauge!(m::SERVER_CONNECTIONS, "pool" => p.label.to_string(), "state" => "active").set(active as f64);
            metrics::gauge!(m::SERVER_CONNECTIONS, "pool" => p.label.to_string(), "state" => "idle")
                .set(st.idle_connections as f64);
        }
    }
}

/// How to log in upstream as `user` from configuration alone: the users file's password or
/// MD5 hash, else the upstream URL's password for its own user.
fn configured_credentials(users: &UserStore, upstream: &Upstream, user: &str) -> Credentials {
    let from_file = users.get(user).and_then(|u| {
        u.plain_password()
            .map(|p| Credentials::Password(p.to_string()))
            .or_else(|| match &u.secret {
                crate::auth::Secret::Md5(h) => Some(Credentials::Md5(h.clone())),
                _ => None,
            })
    });
    from_file
        .or_else(|| {
            (user == upstream.user)
                .then(|| upstream.password.clone().map(Credentials::Password))
                .flatten()
        })
        .unwrap_or_default()
}
