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
mod flags;
pub use flags::Flags;
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
mod tests;
