//! `[databases.NAME]` and `[users.NAME]` in the TOML file: settings for the pools of one
//! client-facing database name or of one user. A pool (database, user) takes each setting
//! from its user's entry, else its database's, else the global flag.

use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::time::Duration;

use super::{MaxActive, PoolMode};

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Server connections per pool (default: `pool-size`).
    #[serde(alias = "pool_size")]
    pub pool_size: Option<usize>,
    /// The upstream database this name stands for (default: the same name), so clients can
    /// keep a name while the database behind it changes. `[databases]` only.
    pub dbname: Option<String>,
    /// Session or transaction pooling for these pools (default: `pool-mode`).
    #[serde(alias = "pool_mode")]
    pub pool_mode: Option<PoolMode>,
    /// Queries each of these pools may run at once, under the upstream's own limit. `auto`
    /// (the default) sets no cap of the pool's own.
    #[serde(alias = "max_active")]
    pub max_active: Option<MaxActive>,
    /// Queries each of these pools may have waiting (under `max-queue`).
    #[serde(alias = "max_queue")]
    pub max_queue: Option<usize>,
    /// Longest wait for these pools' queries (default: `queue-timeout`).
    #[serde(alias = "queue_timeout", default, deserialize_with = "duration")]
    pub queue_timeout: Option<Duration>,
    /// Fair-share weight of the client identities of these pools (as `--share`, which
    /// wins for an identity it names).
    pub share: Option<u32>,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    // Only queue-timeout uses this; toml's message would not name the key.
    super::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("queue-timeout {s:?}: {e}")))
}

/// A pool's own size and mode, after user > database (the guard resolves its bounds the
/// same way, from `GuardConfig::pools`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOverrides {
    pub pool_size: Option<usize>,
    pub pool_mode: Option<PoolMode>,
}

/// Resolves a pool's own settings: each from `[users.USER]`, else `[databases.DB]`.
pub fn resolve(
    databases: &HashMap<String, DatabaseSettings>,
    users: &HashMap<String, DatabaseSettings>,
    database: &str,
    user: &str,
) -> PoolOverrides {
    let (d, u) = (databases.get(database), users.get(user));
    PoolOverrides {
        pool_size: u.and_then(|u| u.pool_size).or(d.and_then(|d| d.pool_size)),
        pool_mode: u.and_then(|u| u.pool_mode).or(d.and_then(|d| d.pool_mode)),
    }
}

impl DatabaseSettings {
    /// `max-active` as the guard's table holds it: `auto` is `usize::MAX` (no cap of the
    /// pool's own, lifting a database's cap when set on a user).
    pub fn max_active_cap(&self) -> Option<usize> {
        self.max_active.map(|m| match m {
            MaxActive::Fixed(n) => n,
            MaxActive::Auto => usize::MAX,
        })
    }
}

/// Checks every entry; the error names the section and the name.
pub fn validate(
    dbs: &HashMap<String, DatabaseSettings>,
    users: &HashMap<String, DatabaseSettings>,
) -> Result<()> {
    for (kind, map) in [("databases", dbs), ("users", users)] {
        for (name, d) in map {
            check(kind, name, d)?;
        }
    }
    if let Some(name) = users.iter().find_map(|(n, u)| u.dbname.as_ref().map(|_| n)) {
        bail!("[users.{name}] dbname: only a [databases] entry can alias a database");
    }
    for name in dbs.keys() {
        if name == "pgsluice" || name == "pgbouncer" {
            bail!("[databases.{name}]: that name is the admin console's");
        }
    }
    Ok(())
}

fn check(kind: &str, name: &str, d: &DatabaseSettings) -> Result<()> {
    if let Some(n) = d.pool_size {
        if n == 0 || n > 10_000 {
            bail!("[{kind}.{name}] pool-size {n}: must be between 1 and 10000");
        }
    }
    if d.dbname.as_deref().is_some_and(str::is_empty) {
        bail!("[{kind}.{name}] dbname: must not be empty");
    }
    if let Some(MaxActive::Fixed(n)) = d.max_active {
        if n == 0 || n > 100_000 {
            bail!("[{kind}.{name}] max-active {n}: must be between 1 and 100000, or auto");
        }
    }
    if d.max_queue.is_some_and(|n| n > 1_000_000) {
        bail!("[{kind}.{name}] max-queue: at most 1000000");
    }
    if d.share.is_some_and(|w| !(1..=1000).contains(&w)) {
        bail!("[{kind}.{name}] share: must be a whole number from 1 to 1000");
    }
    if d.queue_timeout.is_some_and(|t| t.is_zero()) {
        bail!("[{kind}.{name}] queue-timeout 0: must be positive");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HashMap<String, DatabaseSettings> {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn user_entries_win_over_database_entries_field_by_field() {
        let dbs = parse(
            "[app]\npool-size = 3\nmax-active = 2\nqueue-timeout = \"2s\"\npool-mode = \"session\"\n",
        );
        let users = parse(
            "[batch]\npool-size = 1\n[free]\nmax-active = \"auto\"\npool-mode = \"transaction\"\n",
        );
        let r = resolve(&dbs, &users, "app", "batch");
        assert_eq!(
            (r.pool_size, r.pool_mode),
            (Some(1), Some(PoolMode::Session))
        );
        let r = resolve(&dbs, &users, "app", "free");
        assert_eq!(
            (r.pool_size, r.pool_mode),
            (Some(3), Some(PoolMode::Transaction))
        );
        let r = resolve(&dbs, &users, "other", "other");
        assert_eq!((r.pool_size, r.pool_mode), (None, None));
        assert_eq!(dbs["app"].max_active_cap(), Some(2));
        assert_eq!(users["free"].max_active_cap(), Some(usize::MAX));
        assert_eq!(dbs["app"].queue_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn bad_entries_are_refused_with_their_name() {
        let e = |dbs: &str, users: &str| {
            validate(&parse(dbs), &parse(users))
                .unwrap_err()
                .to_string()
        };
        assert!(e("[a]\nmax-active = 0\n", "").contains("[databases.a] max-active"));
        assert!(e("", "[u]\ndbname = \"x\"\n").contains("[users.u] dbname"));
        assert!(e("", "[u]\nqueue-timeout = \"0\"\n").contains("[users.u] queue-timeout"));
        assert!(toml::from_str::<HashMap<String, DatabaseSettings>>(
            "[a]\nqueue-timeout = \"soon\"\n"
        )
        .is_err());
        assert!(e("", "[u]\nshare = 0\n").contains("[users.u] share"));
        assert!(toml::from_str::<HashMap<String, DatabaseSettings>>("[a]\nweight = 2\n").is_err());
        validate(&parse("[a]\nmax-active = \"auto\"\n"), &parse("")).unwrap();
    }
}
