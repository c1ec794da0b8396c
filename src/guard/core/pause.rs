//! Pools of one database paused on their own, and the names and bounds a pool is given
//! when it is registered (see the module doc of `guard`).

use std::sync::Arc;
use std::time::Instant;

use super::{Completion, Core};
use crate::guard::pools::pool_entry;

impl<T> Core<T> {
    /// Pauses the pools of one database (present and future); the rest run on.
    pub(crate) fn pause_database(&mut self, database: &str) {
        self.paused_dbs.insert(database.to_string());
        for p in self.pools.values_mut() {
            if p.names.as_ref().is_some_and(|(d, _)| d == database) {
                p.paused = true;
            }
        }
    }

    pub(crate) fn is_database_paused(&self, database: &str) -> bool {
        self.paused_dbs.contains(database)
    }

    /// Databases paused on their own, sorted.
    pub(crate) fn paused_databases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.paused_dbs.iter().cloned().collect();
        v.sort();
        v
    }

    /// Resumes one database, or (None) everything: the whole proxy and every database.
    pub(crate) fn resume_database(
        &mut self,
        database: Option<&str>,
        now: Instant,
        out: &mut Vec<Completion<T>>,
    ) {
        match database {
            Some(db) => {
                self.paused_dbs.remove(db);
            }
            None => self.paused_dbs.clear(),
        }
        for p in self.pools.values_mut() {
            p.paused = p
                .names
                .as_ref()
                .is_some_and(|(d, _)| self.paused_dbs.contains(d));
        }
        if database.is_none() {
            self.paused = false;
        }
        // Time spent paused is not a standing queue.
        self.nonempty_since = (self.normal_queued > 0).then_some(now);
        self.dispatch(now, out);
    }

    /// Tells the core which database and user a pool label stands for, so that the pool
    /// gets its own bounds and its database's pause.
    pub(crate) fn register_pool(&mut self, label: &Arc<str>, database: &str, user: &str) {
        let limit = self.limit;
        let limits = self.cfg.pools.resolve(database, user);
        let paused = self.paused_dbs.contains(database);
        let p = pool_entry(&mut self.pools, label, limit);
        p.names = Some((database.to_string(), user.to_string()));
        p.limits = limits;
        p.paused = paused;
        p.m.limit.set(p.limit(limit) as f64);
    }

    #[cfg(test)]
    pub(crate) fn pool_limits(&self, pool: &str) -> crate::guard::config::PoolLimits {
        self.pools.get(pool).map(|p| p.limits).unwrap_or_default()
    }
}
