//! `[databases.NAME]` in the TOML file: settings for one client-facing database name.

use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Server connections per user of this database (default: `pool-size`).
    #[serde(alias = "pool_size")]
    pub pool_size: Option<usize>,
    /// The upstream database this name stands for (default: the same name), so clients can
    /// keep a name while the database behind it changes.
    pub dbname: Option<String>,
}

/// Checks every entry; the error names the database.
pub fn validate(dbs: &HashMap<String, DatabaseSettings>) -> Result<()> {
    for (name, d) in dbs {
        if let Some(n) = d.pool_size {
            if n == 0 || n > 10_000 {
                bail!("[databases.{name}] pool-size {n}: must be between 1 and 10000");
            }
        }
        if d.dbname.as_deref().is_some_and(str::is_empty) {
            bail!("[databases.{name}] dbname: must not be empty");
        }
        if name == "pgsluice" || name == "pgbouncer" {
            bail!("[databases.{name}]: that name is the admin console's");
        }
    }
    Ok(())
}
