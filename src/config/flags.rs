//! The command line's flags (each also `PGSLUICE_<NAME>` and a TOML key), as given:
//! everything optional, validated into `Config`.

use super::*;

/// Every setting; all optional here so the TOML file can fill what flags and env leave out.
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Flags {
    /// Client-facing address.
    #[arg(long, env = "PGSLUICE_LISTEN")]
    pub listen: Option<String>,
    /// The database, as a libpq URL (postgres://user:password@host:port/dbname).
    #[arg(long, env = "PGSLUICE_UPSTREAM")]
    pub upstream: Option<String>,
    /// HTTP admin and Prometheus address, or "off".
    #[arg(long, env = "PGSLUICE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// When a server connection returns to the pool.
    #[arg(long, env = "PGSLUICE_POOL_MODE")]
    pub pool_mode: Option<PoolMode>,
    /// Server connections per (database, user).
    #[arg(long, env = "PGSLUICE_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Queries actively running upstream, all pools together: a number, or "auto" to follow
    /// the database's measured throughput (default: pool-size).
    #[arg(long, env = "PGSLUICE_MAX_ACTIVE")]
    pub max_active: Option<MaxActive>,
    /// With --max-active auto: the lowest limit (default 2).
    #[arg(long, env = "PGSLUICE_MAX_ACTIVE_MIN")]
    pub max_active_min: Option<usize>,
    /// With --max-active auto: the highest limit (default: the server connections the pools
    /// may open, which also caps any value given).
    #[arg(long, env = "PGSLUICE_MAX_ACTIVE_MAX")]
    pub max_active_max: Option<usize>,
    /// Waiting queries beyond which new ones are shed at once.
    #[arg(long, env = "PGSLUICE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Longest wait for a slot (e.g. 5s, 300ms).
    #[arg(long, env = "PGSLUICE_QUEUE_TIMEOUT")]
    pub queue_timeout: Option<String>,
    /// Longest a query may run before the server is told to cancel it (0 = off).
    #[arg(long, env = "PGSLUICE_QUERY_TIMEOUT")]
    pub query_timeout: Option<String>,
    /// Standing-queue detection: a queue whose oldest query has waited this long is shed
    /// down to --codel-target (0 turns standing-queue shedding off).
    #[arg(long, env = "PGSLUICE_CODEL_INTERVAL")]
    pub codel_interval: Option<String>,
    /// While the queue stands, queries that waited longer than this are refused.
    #[arg(long, env = "PGSLUICE_CODEL_TARGET")]
    pub codel_target: Option<String>,
    /// Fair-share weight of a client identity, IDENT=WEIGHT (repeatable).
    #[arg(long = "share", env = "PGSLUICE_SHARE", value_delimiter = ',')]
    #[serde(default, alias = "share")]
    pub shares: Vec<String>,
    /// Client authentication method (default trust on a loopback listener, else required).
    #[arg(long, env = "PGSLUICE_AUTH")]
    pub auth: Option<AuthMethod>,
    /// Users file (see docs/USERS_FILE.md). In the TOML file also `users-file`, so that
    /// `[users.NAME]` tables can sit beside it.
    #[arg(long, env = "PGSLUICE_USERS")]
    #[serde(alias = "users-file")]
    pub users: Option<PathBuf>,
    /// TOML file with the same keys as the flags.
    #[arg(long, env = "PGSLUICE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Worker threads: 1 runs every session on one thread (no cross-thread wake-ups, the
    /// sidecar case), 0 one per core (the default; needs a restart).
    #[arg(long, env = "PGSLUICE_THREADS")]
    pub threads: Option<usize>,
    /// Log output format.
    #[arg(long, env = "PGSLUICE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Client connections accepted at once; the excess gets 53300.
    #[arg(long, env = "PGSLUICE_MAX_CLIENT_CONN")]
    pub max_client_conn: Option<usize>,
    /// Roll back a transaction left open and silent for longer than this (0 = off).
    #[arg(long, env = "PGSLUICE_IDLE_IN_TRANSACTION_TIMEOUT")]
    pub idle_in_transaction_timeout: Option<String>,
    /// How long a cancelled backend may take to answer before its connection is closed.
    #[arg(long, env = "PGSLUICE_CANCEL_GRACE")]
    pub cancel_grace: Option<String>,
    /// Close server connections older than this (0 = never).
    #[arg(long, env = "PGSLUICE_SERVER_LIFETIME")]
    pub server_lifetime: Option<String>,
    /// Close server connections idle for longer than this (0 = never).
    #[arg(long, env = "PGSLUICE_SERVER_IDLE_TIMEOUT")]
    pub server_idle_timeout: Option<String>,
    /// Upper bound on connecting and logging in to the upstream.
    #[arg(long, env = "PGSLUICE_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Clients must finish startup and authentication within this.
    #[arg(long, env = "PGSLUICE_STARTUP_TIMEOUT")]
    pub startup_timeout: Option<String>,
    /// On SIGTERM, how long running transactions may take to finish.
    #[arg(long, env = "PGSLUICE_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Bearer token required by the admin API's mutating endpoints.
    #[arg(long, env = "PGSLUICE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Look up users missing from the users file on the upstream, logged in as this user.
    #[arg(long, env = "PGSLUICE_AUTH_USER")]
    pub auth_user: Option<String>,
    /// Query returning (name, secret) for $1 (default: PgBouncer's, on pg_shadow).
    #[arg(long, env = "PGSLUICE_AUTH_QUERY")]
    pub auth_query: Option<String>,
    /// Database the auth query runs in (default: the client's).
    #[arg(long, env = "PGSLUICE_AUTH_DBNAME")]
    pub auth_dbname: Option<String>,
    /// How long a looked-up user (or its absence) is remembered.
    #[arg(long, env = "PGSLUICE_AUTH_CACHE_TTL")]
    pub auth_cache_ttl: Option<String>,
    /// Users who may run every admin console command (database `pgsluice` or `pgbouncer`).
    #[arg(long, env = "PGSLUICE_ADMIN_USERS", value_delimiter = ',')]
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users who may run the console's SHOW commands only.
    #[arg(long, env = "PGSLUICE_STATS_USERS", value_delimiter = ',')]
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// Consecutive upstream failures that open the circuit breaker.
    #[arg(long, env = "PGSLUICE_BREAKER_THRESHOLD")]
    pub breaker_threshold: Option<u32>,
    /// First circuit-breaker cool-down; doubles on each re-open.
    #[arg(long, env = "PGSLUICE_BREAKER_COOLDOWN")]
    pub breaker_cooldown: Option<String>,
    /// Longest circuit-breaker cool-down.
    #[arg(long, env = "PGSLUICE_BREAKER_MAX_COOLDOWN")]
    pub breaker_max_cooldown: Option<String>,
    /// Several upstream hosts: how often each one's role (primary, standby) is checked.
    #[arg(long, env = "PGSLUICE_HOST_CHECK_INTERVAL")]
    pub host_check_interval: Option<String>,
    /// Several upstream hosts: replay lag (bytes; kB, MB, GB suffixes) beyond which a
    /// standby gets no new read connections (0 = no bound).
    #[arg(long, env = "PGSLUICE_MAX_REPLICA_LAG")]
    pub max_replica_lag: Option<String>,
    /// How often the upstream health check runs (readiness, breaker).
    #[arg(long, env = "PGSLUICE_HEALTH_INTERVAL")]
    pub health_interval: Option<String>,
    /// Named prepared statements kept per server connection in transaction mode (0 passes
    /// statement names through untouched, as older poolers do).
    #[arg(long, env = "PGSLUICE_MAX_PREPARED_STATEMENTS")]
    pub max_prepared_statements: Option<usize>,
    /// Most distinct client identities used as metric labels; the rest fold into "other".
    #[arg(long, env = "PGSLUICE_IDENTITY_LABEL_CAP")]
    pub identity_label_cap: Option<usize>,
    /// Certificate chain (PEM) offered to clients that ask for TLS.
    #[arg(long, env = "PGSLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "PGSLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate signed by one of them.
    #[arg(long, env = "PGSLUICE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Client TLS: disable, allow or require (default allow with a certificate, else disable).
    #[arg(long, env = "PGSLUICE_TLS_MODE")]
    pub tls_mode: Option<TlsMode>,
    /// Per-database settings (`[databases.NAME]`; the file only).
    #[arg(skip)]
    #[serde(default)]
    pub databases: HashMap<String, DatabaseSettings>,
    /// Per-user settings (`[users.NAME]`; the file only).
    #[arg(skip)]
    #[serde(default, rename = "user-settings")]
    pub user_settings: HashMap<String, DatabaseSettings>,
}
