//! Configuration from flags, `PGSLUICE_*` environment variables and an optional TOML file,
//! in that order of precedence, validated into a [`Config`] with one-line errors.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use tls_params::{ChannelBindingMode, SslMode, TlsMode};

mod auth_method;
mod databases;
pub use auth_method::AuthMethod;
pub mod tls_params;
mod upstream;
pub use databases::{resolve as resolve_pool_settings, DatabaseSettings};
pub use upstream::{HostAddr, TargetAttrs, Upstream};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pgsluice",
    version,
    about = "PostgreSQL proxy that pools connections and guards the database's concurrency"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

/// The flags alone, for updating one of them (the console's SET) without a subcommand.
#[derive(Parser)]
#[command(name = "pgsluice")]
struct OneSetting {
    #[command(flatten)]
    flags: Flags,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Start a throwaway PostgreSQL with pgsluice in front of it, for trying things out.
    Demo {
        /// Port for pgsluice to listen on (0 picks a free one).
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
    /// Print a SCRAM-SHA-256 verifier for a password read from stdin (for the users file).
    HashPassword,
    /// A live view of a running pgsluice, read from its admin API.
    Top {
        /// The admin API's address (`--admin-listen` of the proxy).
        #[arg(long, default_value = "127.0.0.1:9930")]
        admin: std::net::SocketAddr,
        /// Time between polls.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Print one frame as text and exit (two polls an interval apart).
        #[arg(long)]
        once: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// `--max-active`: a fixed number of slots, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxActive {
    Fixed(usize),
    Auto,
}

impl std::str::FromStr for MaxActive {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(MaxActive::Auto);
        }
        s.parse()
            .map(MaxActive::Fixed)
            .map_err(|_| format!("{s:?}: expected a number or auto"))
    }
}

impl<'de> Deserialize<'de> for MaxActive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            N(usize),
            S(String),
        }
        match Repr::deserialize(d)? {
            Repr::N(n) => Ok(MaxActive::Fixed(n)),
            Repr::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

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

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub admin_listen: Option<SocketAddr>,
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    /// The static limit; with `adaptive`, the limit a new upstream starts from.
    pub max_active: usize,
    /// `--max-active auto`: (min, max) of the adaptive limit; max is `usize::MAX` when
    /// only the pools' capacity bounds it.
    pub adaptive: Option<(usize, usize)>,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub query_timeout: Option<Duration>,
    /// None: standing-queue shedding off.
    pub codel_interval: Option<Duration>,
    pub codel_target: Duration,
    pub shares: HashMap<String, u32>,
    pub auth: AuthMethod,
    pub users: Option<PathBuf>,
    pub log_format: LogFormat,
    /// Runtime worker threads (0 = one per core); read once at start.
    pub threads: usize,
    pub max_client_conn: usize,
    pub idle_in_transaction_timeout: Option<Duration>,
    pub cancel_grace: Duration,
    pub server_lifetime: Option<Duration>,
    pub server_idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub admin_token: Option<String>,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    pub auth_user: Option<String>,
    pub auth_query: String,
    pub auth_dbname: Option<String>,
    pub auth_cache_ttl: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub breaker_max_cooldown: Duration,
    pub health_interval: Duration,
    /// Role checks of a multi-host upstream.
    pub host_check_interval: Duration,
    /// Bytes of replay lag beyond which a standby gets no new read connections.
    pub max_replica_lag: Option<u64>,
    pub identity_label_cap: usize,
    pub databases: HashMap<String, DatabaseSettings>,
    pub user_settings: HashMap<String, DatabaseSettings>,
    pub max_prepared_statements: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_mode: TlsMode,
    /// The TOML file this came from, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// The flags as given, so a reload re-applies them over the new file.
    pub flags: Flags,
    /// Bumped on every reload so sessions notice a new configuration cheaply.
    pub generation: u64,
}

impl Config {
    /// Parses a full command line (first item is the program name) with env and file layers.
    pub fn from_args<I, T>(args: I) -> Result<Config>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| anyhow!("{}", e.to_string().trim()))?;
        Config::from_flags(cli.flags)
    }

    pub fn from_flags(flags: Flags) -> Result<Config> {
        let file = match &flags.config {
            Some(path) => Some(load_file(path)?),
            None => None,
        };
        Config::build(flags, file)
    }

    /// Re-reads the TOML file (if any) under the original flags, for SIGHUP.
    pub fn reload(&self) -> Result<Config> {
        Config::from_flags(self.flags.clone())
    }

    /// This configuration with one setting changed as if it had been given as a flag
    /// (`key` in SHOW CONFIG's spelling, `max_active` for `--max-active`).
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config> {
        let mut one = OneSetting {
            flags: self.flags.clone(),
        };
        let flag = format!("--{}", key.replace('_', "-"));
        one.try_update_from(["pgsluice", flag.as_str(), value])
            .map_err(|e| {
                // clap's first line says what is wrong; the rest is command-line usage.
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                anyhow!("{}", first.trim_start_matches("error: "))
            })?;
        Config::from_flags(one.flags)
    }

    fn build(flags: Flags, file: Option<Flags>) -> Result<Config> {
        let f = file.unwrap_or_default();
        macro_rules! pick {
            ($field:ident) => {
                flags.$field.clone().or(f.$field.clone())
            };
        }
        let listen_s = pick!(listen).unwrap_or_else(|| "127.0.0.1:6432".into());
        let listen: SocketAddr = listen_s
            .parse()
            .map_err(|_| anyhow!("--listen {listen_s:?}: expected HOST:PORT with an IP address"))?;
        let upstream = Upstream::parse(
            &pick!(upstream).unwrap_or_else(|| "postgres://127.0.0.1:5432".into()),
        )?;
        let admin_s = pick!(admin_listen).unwrap_or_else(|| "127.0.0.1:9930".into());
        let admin_listen =
            if admin_s == "off" {
                None
            } else {
                Some(admin_s.parse().map_err(|_| {
                    anyhow!("--admin-listen {admin_s:?}: expected HOST:PORT or off")
                })?)
            };
        let pool_size = pick!(pool_size).unwrap_or(20);
        if pool_size == 0 || pool_size > 10_000 {
            bail!("--pool-size {pool_size}: must be between 1 and 10000");
        }
        let (lo, hi) = (pick!(max_active_min), pick!(max_active_max));
        let (max_active, adaptive) = match pick!(max_active) {
            Some(MaxActive::Auto) => {
                let lo = lo.unwrap_or(2);
                let hi = hi.unwrap_or(usize::MAX);
                if lo == 0 || hi < lo {
                    bail!("--max-active-min {lo} / --max-active-max {hi}: need 1 <= min <= max");
                }
                (hi.min(pool_size), Some((lo, hi)))
            }
            fixed => {
                if lo.is_some() || hi.is_some() {
                    bail!("--max-active-min and --max-active-max need --max-active auto");
                }
                let n = match fixed {
                    Some(MaxActive::Fixed(n)) => n,
                    _ => pool_size,
                };
                if n == 0 {
                    bail!("--max-active 0: must be at least 1");
                }
                (n, None)
            }
        };
        let shares_src = if flags.shares.is_empty() {
            &f.shares
        } else {
            &flags.shares
        };
        let mut shares = HashMap::new();
        for s in shares_src {
            let (ident, w) = s
                .rsplit_once('=')
                .ok_or_else(|| anyhow!("--share {s:?}: expected IDENT=WEIGHT"))?;
            let w: u32 = w
                .parse()
                .ok()
                .filter(|w| *w >= 1 && *w <= 1000)
                .ok_or_else(|| {
                    anyhow!("--share {s:?}: weight must be a whole number from 1 to 1000")
                })?;
            shares.insert(ident.to_string(), w);
        }
        let auth = match pick!(auth) {
            Some(a) => a,
            None if listen.ip().is_loopback() => AuthMethod::Trust,
            None => bail!(
                "--listen {listen} is not loopback: choose --auth (md5 or scram-sha-256 with --users, or trust explicitly)"
            ),
        };
        let users = pick!(users);
        if auth != AuthMethod::Trust && users.is_none() && pick!(auth_user).is_none() {
            bail!("--auth {} needs --users FILE or --auth-user", auth.as_str());
        }
        let dur = |name: &str, v: Option<String>, default: &str| -> Result<Duration> {
            let s = v.unwrap_or_else(|| default.to_string());
            parse_duration(&s).map_err(|e| anyhow!("--{name} {s:?}: {e}"))
        };
        let opt = |d: Duration| (!d.is_zero()).then_some(d);
        let (tls_cert, tls_key, tls_client_ca) =
            (pick!(tls_cert), pick!(tls_key), pick!(tls_client_ca));
        let tls_mode = tls_params::client_mode(
            tls_cert.is_some(),
            tls_key.is_some(),
            tls_client_ca.is_some(),
            pick!(tls_mode),
        )
        .map_err(anyhow::Error::msg)?;
        let cfg = Config {
            listen,
            upstream,
            admin_listen,
            pool_mode: pick!(pool_mode).unwrap_or(PoolMode::Transaction),
            pool_size,
            max_active,
            adaptive,
            max_queue: pick!(max_queue).unwrap_or(1000),
            queue_timeout: dur("queue-timeout", pick!(queue_timeout), "5s")?,
            query_timeout: opt(dur("query-timeout", pick!(query_timeout), "0")?),
            codel_interval: opt(dur("codel-interval", pick!(codel_interval), "100ms")?),
            codel_target: dur("codel-target", pick!(codel_target), "50ms")?,
            shares,
            auth,
            users,
            log_format: pick!(log_format).unwrap_or(LogFormat::Text),
            threads: pick!(threads).unwrap_or(0),
            max_client_conn: pick!(max_client_conn).unwrap_or(10_000),
            idle_in_transaction_timeout: opt(dur(
                "idle-in-transaction-timeout",
                pick!(idle_in_transaction_timeout),
                "0",
            )?),
            cancel_grace: dur("cancel-grace", pick!(cancel_grace), "5s")?,
            server_lifetime: opt(dur("server-lifetime", pick!(server_lifetime), "1h")?),
            server_idle_timeout: opt(dur(
                "server-idle-timeout",
                pick!(server_idle_timeout),
                "10m",
            )?),
            connect_timeout: dur("connect-timeout", pick!(connect_timeout), "5s")?,
            startup_timeout: dur("startup-timeout", pick!(startup_timeout), "15s")?,
            shutdown_timeout: dur("shutdown-timeout", pick!(shutdown_timeout), "30s")?,
            admin_token: pick!(admin_token).filter(|t| !t.is_empty()),
            admin_users: flag_or_file(&flags.admin_users, &f.admin_users),
            stats_users: flag_or_file(&flags.stats_users, &f.stats_users),
            auth_user: pick!(auth_user).filter(|u| !u.is_empty()),
            auth_query: pick!(auth_query).unwrap_or_else(|| {
                "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1".into()
            }),
            auth_dbname: pick!(auth_dbname).filter(|d| !d.is_empty()),
            auth_cache_ttl: dur("auth-cache-ttl", pick!(auth_cache_ttl), "30s")?,
            breaker_threshold: pick!(breaker_threshold).unwrap_or(5),
            breaker_cooldown: dur("breaker-cooldown", pick!(breaker_cooldown), "500ms")?,
            breaker_max_cooldown: dur("breaker-max-cooldown", pick!(breaker_max_cooldown), "30s")?,
            health_interval: dur("health-interval", pick!(health_interval), "1s")?,
            host_check_interval: dur("host-check-interval", pick!(host_check_interval), "250ms")?,
            max_replica_lag: match pick!(max_replica_lag) {
                Some(v) => Some(parse_bytes(&v).ok_or_else(|| {
                    anyhow!("--max-replica-lag {v:?}: expected bytes, e.g. 16MB")
                })?)
                .filter(|b| *b > 0),
                None => None,
            },
            identity_label_cap: pick!(identity_label_cap).unwrap_or(50),
            databases: f.databases.clone(),
            user_settings: f.user_settings.clone(),
            max_prepared_statements: pick!(max_prepared_statements).unwrap_or(200),
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_mode,
            config_file: flags.config.clone(),
            flags,
            generation: 0,
        };
        databases::validate(&cfg.databases, &cfg.user_settings)?;
        if cfg.queue_timeout.is_zero() {
            bail!("--queue-timeout 0: must be positive (use a small value to shed at once)");
        }
        if cfg.connect_timeout.is_zero()
            || cfg.startup_timeout.is_zero()
            || cfg.health_interval.is_zero()
            || cfg.host_check_interval.is_zero()
        {
            bail!("--connect-timeout, --startup-timeout, --health-interval and --host-check-interval must be positive");
        }
        if cfg.breaker_threshold == 0 {
            bail!("--breaker-threshold 0: must be at least 1");
        }
        if cfg.max_client_conn == 0 {
            bail!("--max-client-conn 0: must be at least 1");
        }
        Ok(cfg)
    }
}

/// A list flag given on the command line wins over the file's; names are trimmed, empty
/// ones dropped.
fn flag_or_file(flag: &[String], file: &[String]) -> Vec<String> {
    let src = if flag.is_empty() { file } else { flag };
    src.iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

fn load_file(path: &Path) -> Result<Flags> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    parse_file_flags(&text).map_err(|e| anyhow!("--config {}: {e}", path.display()))
}

/// Parses the text of a TOML configuration file into flags, without touching the disk.
pub fn parse_file_flags(text: &str) -> Result<Flags, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    // Accept snake_case keys as well as the flags' kebab-case.
    let mut normalized: toml::Table = table
        .into_iter()
        .map(|(k, v)| (k.replace('_', "-"), v))
        .collect();
    // `users` is the users file's path, or (as a table) the per-user settings.
    if normalized.get("users").is_some_and(toml::Value::is_table) {
        if let Some(t) = normalized.remove("users") {
            normalized.insert("user-settings".into(), t);
        }
    }
    normalized
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_owned())
}

impl Config {
    /// Builds a configuration from a TOML file's text alone (no flags, no environment).
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let file = parse_file_flags(text).map_err(|e| anyhow!("config: {e}"))?;
        Config::build(Flags::default(), Some(file))
    }
}

/// "5s", "300ms", "1m30s", or "0" for off.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 5s, 300ms, 2m)"))
}

/// `1048576`, `512kB`, `16MB`, `1GB` (powers of 1024, as PostgreSQL's own units).
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "k" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Result<Config> {
        let mut v = vec!["pgsluice"];
        v.extend_from_slice(args);
        Config::from_args(v)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6432".parse().unwrap());
        assert_eq!(c.pool_size, 20);
        assert_eq!(c.max_active, 20);
        assert_eq!(c.max_queue, 1000);
        assert_eq!(c.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.query_timeout, None);
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        assert_eq!(c.auth, AuthMethod::Trust);
        assert_eq!(c.upstream.first().port, 5432);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_bytes("512kB"), Some(512 << 10));
        assert_eq!(parse_bytes("1 GB"), Some(1 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("5TB"), None);
        let c = cfg(&["--max-replica-lag", "0"]).unwrap();
        assert_eq!(c.max_replica_lag, None);
        assert!(cfg(&["--max-replica-lag", "far"]).is_err());
    }

    #[test]
    fn bad_values_name_themselves() {
        let e = cfg(&["--queue-timeout", "soon"]).unwrap_err().to_string();
        assert!(e.contains("--queue-timeout \"soon\""), "{e}");
        let e = cfg(&["--share", "a=0"]).unwrap_err().to_string();
        assert!(e.contains("--share"), "{e}");
        let e = cfg(&["--listen", "0.0.0.0:6432"]).unwrap_err().to_string();
        assert!(e.contains("--auth"), "{e}");
        let e = cfg(&["--upstream", "mysql://x"]).unwrap_err().to_string();
        assert!(e.contains("scheme"), "{e}");
        assert!(cfg(&["--pool-size", "0"]).is_err());
        assert!(cfg(&["--pool-size", "many"]).is_err());
    }

    #[test]
    fn file_fills_what_flags_leave() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "pool_size = 7\nmax-queue = 3\nshare = [\"a=2\"]\nqueue-timeout = \"300ms\"\n",
        )
        .unwrap();
        let c = cfg(&["--config", p.to_str().unwrap(), "--max-queue", "9"]).unwrap();
        assert_eq!(c.pool_size, 7);
        assert_eq!(c.max_queue, 9);
        assert_eq!(c.shares.get("a"), Some(&2));
        assert_eq!(c.queue_timeout, Duration::from_millis(300));
        std::fs::write(&p, "pool-sise = 7\n").unwrap();
        let e = cfg(&["--config", p.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool-sise"), "{e}");
    }

    #[test]
    fn max_active_auto_from_flags_and_toml() {
        let c = cfg(&["--max-active", "auto", "--pool-size", "8"]).unwrap();
        assert_eq!(c.adaptive, Some((2, usize::MAX)));
        assert_eq!(c.max_active, 8);
        let c = cfg(&[
            "--max-active",
            "AUTO",
            "--max-active-min",
            "3",
            "--max-active-max",
            "6",
        ])
        .unwrap();
        assert_eq!(c.adaptive, Some((3, 6)));
        assert_eq!(c.max_active, 6);
        let c = Config::from_toml_str("max-active = \"auto\"\nmax_active_max = 5\n").unwrap();
        assert_eq!(c.adaptive, Some((2, 5)));
        let c = Config::from_toml_str("max-active = 7\n").unwrap();
        assert_eq!((c.max_active, c.adaptive), (7, None));
        assert!(cfg(&["--max-active", "sometimes"]).is_err());
        assert!(cfg(&["--max-active", "4", "--max-active-min", "2"]).is_err());
        assert!(cfg(&[
            "--max-active",
            "auto",
            "--max-active-min",
            "5",
            "--max-active-max",
            "4"
        ])
        .is_err());
        assert!(cfg(&["--max-active", "auto", "--max-active-min", "0"]).is_err());
        assert!(Config::from_toml_str("max-active = \"x\"\n").is_err());
        assert_eq!(cfg(&[]).unwrap().adaptive, None);
    }

    #[test]
    fn toml_text_builds_without_a_file() {
        let c = Config::from_toml_str("pool_size = 3\nqueue-timeout = \"250ms\"\n").unwrap();
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.queue_timeout, Duration::from_millis(250));
        assert!(Config::from_toml_str("pool-size = 0\n").is_err());
        assert!(Config::from_toml_str("pool-size = [\n").is_err());
        assert!(Config::from_toml_str("nonsense = 1\n").is_err());
    }
}
