//! The upstream as an object: its hosts, the role each one plays right now (detected, not
//! configured) and which host a new server connection of a route may go to.
//!
//! With one host nothing is polled and every connection goes there, as before. With several,
//! `monitor` keeps a dedicated connection per host (so role checks never wait for a pool
//! slot) and asks `pg_is_in_recovery()` on a short interval; a promotion is followed at the
//! next check, without a reload. Two hosts that both claim to be primary stop the primary
//! route (fencing) until one of them steps down.

use crate::config::{HostAddr, TargetAttrs, Upstream};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub mod monitor;

/// What a pool's connections are for: the default route (writes and everything else) or
/// reads a client asked to send to standbys (the `NAME@ro` database).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica,
}

impl Route {
    /// The route a client-facing database name asks for, and the name without its suffix.
    pub fn of_database(database: &str) -> (&str, Route) {
        match database.strip_suffix(READ_SUFFIX) {
            Some(base) if !base.is_empty() => (base, Route::Replica),
            _ => (database, Route::Primary),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Primary => "primary",
            Route::Replica => "replica",
        }
    }
}

/// A client that connects to database `app@ro` reads from a standby of `app`.
pub const READ_SUFFIX: &str = "@ro";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Not checked yet (or a single-host upstream, which is never polled).
    Unknown = 0,
    Primary = 1,
    Standby = 2,
    /// The latest check could not connect or got no answer.
    Down = 3,
}

impl Role {
    fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Primary,
            2 => Role::Standby,
            3 => Role::Down,
            _ => Role::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Down => "down",
        }
    }
}

/// One host and what the latest check found.
pub struct HostState {
    pub addr: HostAddr,
    pub label: String,
    role: AtomicU8,
    /// WAL position in bytes: written (primary) or replayed (standby); 0 when unknown.
    lsn: AtomicU64,
    /// Milliseconds since the topology was made, of the latest answered check.
    checked_ms: AtomicU64,
    /// Server connections of this proxy open to this host (how reads are balanced).
    open: AtomicUsize,
    pub role_changes: AtomicU64,
}

/// One open server connection to a host; dropping it uncounts it.
pub struct OpenOnHost {
    topology: Arc<Topology>,
    pub idx: usize,
}

impl Drop for OpenOnHost {
    fn drop(&mut self) {
        self.topology.hosts[self.idx]
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl HostState {
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }
}

/// Why no host can take a connection of a route right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoHost {
    #[error("no primary among the upstream hosts {0}")]
    NoPrimary(String),
    #[error(
        "more than one upstream host claims to be primary ({0}); writes stop until one steps down"
    )]
    TwoPrimaries(String),
    #[error("every upstream host is down ({0})")]
    AllDown(String),
}

pub struct Topology {
    pub hosts: Vec<HostState>,
    target: TargetAttrs,
    /// Replication lag in bytes beyond which a standby gets no new read connections.
    max_lag: Option<u64>,
    changed: watch::Sender<u64>,
    started: Instant,
}

impl Topology {
    pub fn new(up: &Upstream, max_lag: Option<u64>) -> Arc<Topology> {
        let hosts = up
            .hosts
            .iter()
            .map(|h| HostState {
                addr: h.clone(),
                label: h.label(),
                role: AtomicU8::new(Role::Unknown as u8),
                lsn: AtomicU64::new(0),
                checked_ms: AtomicU64::new(0),
                open: AtomicUsize::new(0),
                role_changes: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Topology {
            hosts,
            target: up.target,
            max_lag,
            changed: watch::channel(0).0,
            started: Instant::now(),
        })
    }

    /// One host: nothing is polled and every route goes there.
    pub fn is_single(&self) -> bool {
        self.hosts.len() == 1
    }

    pub fn host(&self, idx: usize) -> &HostState {
        &self.hosts[idx]
    }

    pub fn target(&self) -> TargetAttrs {
        self.target
    }

    /// Records what a check found; wakes everyone waiting for a host when the role changed.
    pub fn observe(&self, idx: usize, role: Role, lsn: Option<u64>) {
        let h = &self.hosts[idx];
        if let Some(l) = lsn {
            h.lsn.store(l, Ordering::Relaxed);
        }
        if role != Role::Down {
            h.checked_ms
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        let old = Role::from_u8(h.role.swap(role as u8, Ordering::AcqRel));
        if old != role {
            h.role_changes.fetch_add(1, Ordering::Relaxed);
            self.changed.send_modify(|g| *g += 1);
            match role {
                Role::Down => {
                    tracing::warn!(host = %h.label, was = old.as_str(), "upstream host is down")
                }
                _ => {
                    tracing::info!(host = %h.label, role = role.as_str(), was = old.as_str(), "upstream host role")
                }
            }
        }
    }

    /// How long ago the host last answered a check (None: never).
    pub fn checked_ago(&self, idx: usize) -> Option<Duration> {
        let at = self.hosts[idx].checked_ms.load(Ordering::Relaxed);
        (at > 0).then(|| {
            self.started
                .elapsed()
                .saturating_sub(Duration::from_millis(at))
        })
    }

    /// A standby's replay lag behind the primary in bytes (None: no primary known or not a
    /// standby).
    pub fn lag_bytes(&self, idx: usize) -> Option<u64> {
        let h = &self.hosts[idx];
        if h.role() != Role::Standby {
            return None;
        }
        let primary = self.hosts.iter().find(|p| p.role() == Role::Primary)?;
        Some(primary.lsn().saturating_sub(h.lsn()))
    }

    fn labels(&self, pick: impl Fn(&HostState) -> bool) -> String {
        let v: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| pick(h))
            .map(|h| h.label.as_str())
            .collect();
        v.join(", ")
    }

    fn primaries(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| self.hosts[i].role() == Role::Primary)
            .collect()
    }

    fn standby_ok(&self, idx: usize) -> bool {
        self.hosts[idx].role() == Role::Standby
            && match (self.max_lag, self.lag_bytes(idx)) {
                (Some(max), Some(lag)) => lag <= max,
                // No primary to measure against: the standby is as fresh as anything left.
                _ => true,
            }
    }

    /// Hosts a new connection of `route` may try, best first. A host of unknown role is
    /// listed where no known one fits: the connection itself then proves what it is (see
    /// `accepts_login`).
    pub fn candidates(&self, route: Route) -> Result<Vec<usize>, NoHost> {
        let n = self.hosts.len();
        if n == 1 {
            return Ok(vec![0]);
        }
        let unknown: Vec<usize> = (0..n)
            .filter(|&i| self.hosts[i].role() == Role::Unknown)
            .collect();
        let primaries = self.primaries();
        if primaries.len() > 1 && self.target == TargetAttrs::Primary {
            // Reads may still go to standbys; the default route stops.
            if route == Route::Primary {
                return Err(NoHost::TwoPrimaries(
                    self.labels(|h| h.role() == Role::Primary),
                ));
            }
        }
        match route {
            Route::Primary if self.target == TargetAttrs::Primary => {
                if primaries.len() == 1 {
                    Ok(primaries)
                } else if !unknown.is_empty() {
                    Ok(unknown)
                } else {
                    Err(NoHost::NoPrimary(self.labels(|_| true)))
                }
            }
            Route::Primary => {
                let live: Vec<usize> = (0..n)
                    .filter(|&i| self.hosts[i].role() != Role::Down)
                    .collect();
                if live.is_empty() {
                    Err(NoHost::AllDown(self.labels(|_| true)))
                } else {
                    Ok(live)
                }
            }
            Route::Replica => {
                let mut standbys: Vec<usize> = (0..n).filter(|&i| self.standby_ok(i)).collect();
                // Least busy first; the listed order breaks ties.
                standbys.sort_by_key(|&i| self.hosts[i].open.load(Ordering::Relaxed));
                if primaries.len() == 1 || self.target == TargetAttrs::Any {
                    // No standby fit for reads: the primary serves them (prefer-standby).
                    standbys.extend(primaries.iter().copied());
                }
                standbys.extend(unknown);
                if standbys.is_empty() && primaries.len() > 1 {
                    Err(NoHost::TwoPrimaries(
                        self.labels(|h| h.role() == Role::Primary),
                    ))
                } else if standbys.is_empty() {
                    Err(NoHost::AllDown(self.labels(|_| true)))
                } else {
                    Ok(standbys)
                }
            }
        }
    }

    /// Whether an open connection to `idx` may still serve `route` (checked when a
    /// connection is taken from or given back to its pool): a demoted or fenced primary's
    /// connections leave the primary route, a lagging standby's the read route.
    pub fn still_fits(&self, idx: usize, route: Route) -> bool {
        if self.is_single() {
            return true;
        }
        let role = self.hosts[idx].role();
        match route {
            Route::Primary if self.target == TargetAttrs::Primary => match role {
                Role::Primary => self.primaries().len() == 1,
                // Proved a primary at login and not checked since.
                Role::Unknown => true,
                Role::Standby | Role::Down => false,
            },
            Route::Primary => role != Role::Down,
            Route::Replica => match role {
                Role::Standby => self.standby_ok(idx),
                // Reads stay on the primary only while no standby can take them, so they
                // move back once a lagging standby catches up.
                Role::Primary => !(0..self.hosts.len()).any(|j| self.standby_ok(j)),
                Role::Unknown => true,
                Role::Down => false,
            },
        }
    }

    /// Whether a fresh login to a host of the primary route is a primary by its own word
    /// (PostgreSQL 14+ reports `in_hot_standby`); older servers say nothing and are taken
    /// at the monitor's word.
    pub fn accepts_login(&self, route: Route, params: &[(String, String)]) -> bool {
        if self.is_single() || route != Route::Primary || self.target != TargetAttrs::Primary {
            return true;
        }
        !params
            .iter()
            .any(|(k, v)| k == "in_hot_standby" && v == "on")
    }

    /// Whether the default route has a checked host to go to (readiness of a multi-host
    /// upstream); the error says why not.
    pub fn primary_route_up(&self) -> Result<(), String> {
        match self.candidates(Route::Primary) {
            Ok(list) if list.iter().any(|&i| self.hosts[i].role() != Role::Unknown) => Ok(()),
            Ok(_) => Err("no upstream host has answered a role check yet".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Counts a server connection to `idx` for as long as the returned value lives.
    pub fn count_open(self: &Arc<Self>, idx: usize) -> OpenOnHost {
        self.hosts[idx].open.fetch_add(1, Ordering::Relaxed);
        OpenOnHost {
            topology: self.clone(),
            idx,
        }
    }

    /// Resolves when any host's role changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests;
