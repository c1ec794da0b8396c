//! Per-pool statistics for the admin console (`SHOW STATS`, `SHOW SERVERS`): plain relaxed
//! counters added to once per batch by the session that ran it and read when asked, plus the
//! list of a pool's open server connections (changed only on connect and close).

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Totals since the pool was made. Times are in microseconds, as PgBouncer reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    /// Bytes read from clients.
    pub received: u64,
    /// Bytes written to clients.
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    /// Time spent waiting for a slot and a server connection.
    pub wait_us: u64,
    pub client_parses: u64,
    /// Parse messages the servers executed (ParseComplete seen), injected ones included.
    pub server_parses: u64,
    pub binds: u64,
    pub logins: u64,
    /// Batches the guard refused, and cancels sent upstream (pgsluice's own columns).
    pub sheds: u64,
    pub cancels: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.server_assignments += o.server_assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_us += o.xact_us;
        self.query_us += o.query_us;
        self.wait_us += o.wait_us;
        self.client_parses += o.client_parses;
        self.server_parses += o.server_parses;
        self.binds += o.binds;
        self.logins += o.logins;
        self.sheds += o.sheds;
        self.cancels += o.cancels;
    }

    /// PgBouncer's averages: counts and bytes per second over `dur`, times per event.
    pub fn average(&self, old: &Totals, dur: Duration) -> Totals {
        let us = dur.as_micros() as u64;
        if us == 0 {
            return Totals::default();
        }
        let rate = |now: u64, then: u64| now.saturating_sub(then).saturating_mul(1_000_000) / us;
        let per =
            |now: u64, then: u64, n: u64| now.saturating_sub(then).checked_div(n).unwrap_or(0);
        let queries = self.queries.saturating_sub(old.queries);
        let xacts = self.xacts.saturating_sub(old.xacts);
        let assigns = self
            .server_assignments
            .saturating_sub(old.server_assignments);
        Totals {
            server_assignments: rate(self.server_assignments, old.server_assignments),
            xacts: rate(self.xacts, old.xacts),
            queries: rate(self.queries, old.queries),
            received: rate(self.received, old.received),
            sent: rate(self.sent, old.sent),
            xact_us: per(self.xact_us, old.xact_us, xacts),
            query_us: per(self.query_us, old.query_us, queries),
            wait_us: per(self.wait_us, old.wait_us, assigns),
            client_parses: rate(self.client_parses, old.client_parses),
            server_parses: rate(self.server_parses, old.server_parses),
            binds: rate(self.binds, old.binds),
            logins: rate(self.logins, old.logins),
            sheds: rate(self.sheds, old.sheds),
            cancels: rate(self.cancels, old.cancels),
        }
    }
}

/// What one batch adds to its pool's totals (kept by the session, added in one go).
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchCounts {
    pub received: u64,
    pub sent: u64,
    pub client_parses: u32,
    pub server_parses: u32,
    pub binds: u32,
}

/// How long averages look back: a whole period at least (PgBouncer's `stats_period`).
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct PoolStats {
    server_assignments: AtomicU64,
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_us: AtomicU64,
    query_us: AtomicU64,
    wait_us: AtomicU64,
    client_parses: AtomicU64,
    server_parses: AtomicU64,
    binds: AtomicU64,
    logins: AtomicU64,
    sheds: AtomicU64,
    cancels: AtomicU64,
    /// The totals at the last two period boundaries, for averages over one to two periods.
    marks: Mutex<Marks>,
}

struct Marks {
    older: (Instant, Totals),
    newer: (Instant, Totals),
}

impl Default for Marks {
    fn default() -> Self {
        let now = Instant::now();
        Marks {
            older: (now, Totals::default()),
            newer: (now, Totals::default()),
        }
    }
}

fn add(c: &AtomicU64, v: u64) {
    if v > 0 {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

impl PoolStats {
    pub fn login(&self) {
        add(&self.logins, 1);
    }

    pub fn shed(&self) {
        add(&self.sheds, 1);
    }

    pub fn cancel(&self) {
        add(&self.cancels, 1);
    }

    /// A server connection was handed to a client after waiting `waited` for it (and for
    /// its slot).
    pub fn assigned(&self, waited: Duration) {
        add(&self.server_assignments, 1);
        add(&self.wait_us, micros(waited));
    }

    /// A batch that ran for `took`; `xact` is the transaction it ended, with its length.
    pub fn batch(&self, took: Duration, counts: &BatchCounts, xact: Option<Duration>) {
        add(&self.queries, 1);
        add(&self.query_us, micros(took));
        add(&self.received, counts.received);
        add(&self.sent, counts.sent);
        add(&self.client_parses, counts.client_parses as u64);
        add(&self.server_parses, counts.server_parses as u64);
        add(&self.binds, counts.binds as u64);
        if let Some(x) = xact {
            add(&self.xacts, 1);
            add(&self.xact_us, micros(x));
        }
    }

    pub fn totals(&self) -> Totals {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            server_assignments: l(&self.server_assignments),
            xacts: l(&self.xacts),
            queries: l(&self.queries),
            received: l(&self.received),
            sent: l(&self.sent),
            xact_us: l(&self.xact_us),
            query_us: l(&self.query_us),
            wait_us: l(&self.wait_us),
            client_parses: l(&self.client_parses),
            server_parses: l(&self.server_parses),
            binds: l(&self.binds),
            logins: l(&self.logins),
            sheds: l(&self.sheds),
            cancels: l(&self.cancels),
        }
    }

    /// The totals now and the mark averages are taken against, with its time. Moves the
    /// marks forward when a period has passed, so no background task is needed.
    pub fn with_mark(&self, now: Instant) -> (Totals, Totals, Duration) {
        let cur = self.totals();
        let mut m = self.marks.lock();
        if now.saturating_duration_since(m.newer.0) >= STATS_PERIOD {
            m.older = m.newer;
            m.newer = (now, cur);
        }
        (cur, m.older.1, now.saturating_duration_since(m.older.0))
    }
}

/// One open server connection, for `SHOW SERVERS`.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub pid: i32,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub connected: SystemTime,
    pub tls: bool,
    /// The client (proxy-issued pid) holding the connection; `None` while it is idle.
    pub link: Option<i32>,
}

/// The open server connections of one pool, by connection id.
#[derive(Default)]
pub struct ServerList {
    servers: Mutex<BTreeMap<u64, Listed>>,
}

struct Listed {
    info: ServerInfo,
    /// The linked client's pid, 0 for none (proxy-issued pids are positive). Shared with the
    /// ticket, so linking on every checkout and return takes no lock.
    link: Arc<AtomicI32>,
}

impl ServerList {
    /// Lists `info` until the returned ticket drops (with its connection).
    pub fn open(self: &Arc<Self>, id: u64, info: ServerInfo) -> ServerTicket {
        let link = Arc::new(AtomicI32::new(info.link.unwrap_or(0)));
        let listed = Listed {
            info,
            link: link.clone(),
        };
        self.servers.lock().insert(id, listed);
        ServerTicket {
            list: self.clone(),
            link,
        }
    }

    pub fn all(&self) -> Vec<ServerInfo> {
        let servers = self.servers.lock();
        servers
            .values()
            .map(|l| {
                let mut info = l.info.clone();
                info.link = Some(l.link.load(Ordering::Relaxed)).filter(|&p| p != 0);
                info
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.servers.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes its connection from the list when the connection is dropped.
/// Two pointers, as small as before the link moved into it: every session's future holds
/// one inside its server connection.
pub struct ServerTicket {
    list: Arc<ServerList>,
    /// Also what identifies its entry when it drops (rare: the connection closes).
    link: Arc<AtomicI32>,
}

impl ServerTicket {
    /// Records which client holds the connection (`None`: back in the pool).
    pub fn link(&self, client: Option<i32>) {
        self.link.store(client.unwrap_or(0), Ordering::Relaxed);
    }
}

impl Drop for ServerTicket {
    fn drop(&mut self) {
        self.list
            .servers
            .lock()
            .retain(|_, l| !Arc::ptr_eq(&l.link, &self.link));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_times_per_event() {
        let old = Totals {
            queries: 10,
            query_us: 1_000,
            xacts: 5,
            xact_us: 2_000,
            received: 100,
            ..Default::default()
        };
        let cur = Totals {
            queries: 30,
            query_us: 5_000,
            xacts: 5,
            xact_us: 2_000,
            received: 2_100,
            ..Default::default()
        };
        let a = cur.average(&old, Duration::from_secs(2));
        assert_eq!(a.queries, 10, "20 queries in 2 s");
        assert_eq!(a.query_us, 200, "4,000 us over 20 queries");
        assert_eq!(a.received, 1_000);
        assert_eq!(a.xacts, 0);
        assert_eq!(
            a.xact_us, 0,
            "no transaction in the window: no time per one"
        );
        assert_eq!(cur.average(&old, Duration::ZERO), Totals::default());
    }

    #[test]
    fn marks_move_once_a_period() {
        let s = PoolStats::default();
        let t0 = Instant::now();
        s.batch(Duration::from_millis(1), &BatchCounts::default(), None);
        let (cur, old, _) = s.with_mark(t0);
        assert_eq!((cur.queries, old.queries), (1, 0));
        s.batch(Duration::from_millis(1), &BatchCounts::default(), None);
        let later = t0 + STATS_PERIOD + Duration::from_secs(1);
        // The first boundary: the older mark is still the start.
        let (cur, old, dur) = s.with_mark(later);
        assert_eq!((cur.queries, old.queries), (2, 0));
        assert!(dur >= STATS_PERIOD);
        let (_, old, dur) = s.with_mark(later + STATS_PERIOD);
        assert_eq!(
            old.queries, 2,
            "averages now start at the previous boundary"
        );
        assert!(dur >= STATS_PERIOD && dur < 2 * STATS_PERIOD + Duration::from_secs(2));
    }

    #[test]
    fn server_list_follows_tickets() {
        let l = Arc::new(ServerList::default());
        let info = ServerInfo {
            pid: 7,
            addr: ([127, 0, 0, 1], 5432).into(),
            local: None,
            connected: SystemTime::now(),
            tls: false,
            link: None,
        };
        let a = l.open(1, info.clone());
        a.link(Some(9));
        assert_eq!(l.all()[0].link, Some(9));
        a.link(None);
        assert_eq!(l.all()[0].link, None);
        a.link(Some(9));
        let b = l.open(2, info);
        assert_eq!(l.len(), 2);
        drop(a);
        assert_eq!(l.all().len(), 1);
        drop(b);
        assert!(l.is_empty());
    }
}
