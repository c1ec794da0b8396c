//! The console's SHOW commands. Column names, order and types follow PgBouncer 1.25 so
//! tools written for it parse these unchanged; pgsluice's own columns come after PgBouncer's.

use super::rows::{ResultSet, Ty, Val};
use crate::cancel::CancelEntry;
use crate::config::PoolMode;
use crate::pool::PoolEntry;
use crate::state::Shared;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use Ty::{Int4, Int8, Numeric, Text};

fn pool_mode(shared: &Shared) -> &'static str {
    mode_name(shared.config().pool_mode)
}

fn mode_name(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

/// PgBouncer's timestamp format for connect_time/request_time.
fn stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn wall(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn addr(a: Option<SocketAddr>) -> (Val, Val) {
    match a {
        Some(a) => (
            a.ip().to_canonical().to_string().into(),
            Val::Int(a.port() as i64),
        ),
        None => (Val::Null, Val::Int(0)),
    }
}

fn clients_of(shared: &Shared) -> HashMap<Arc<str>, Vec<Arc<CancelEntry>>> {
    let mut by_pool: HashMap<Arc<str>, Vec<Arc<CancelEntry>>> = HashMap::new();
    for e in shared.cancels.all() {
        by_pool.entry(e.pool.clone()).or_default().push(e);
    }
    by_pool
}

pub fn pools(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int4),
        ("cl_waiting", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active", Int4),
        ("sv_active_cancel", Int4),
        ("sv_being_canceled", Int4),
        ("sv_idle", Int4),
        ("sv_used", Int4),
        ("sv_tested", Int4),
        ("sv_login", Int4),
        ("maxwait", Int4),
        ("maxwait_us", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        // pgsluice's own.
        ("active_queries", Int4),
        ("queued", Int4),
        ("max_active", Int4),
        ("pool_size", Int4),
        ("shed", Numeric),
        ("cancels", Numeric),
        ("circuit", Text),
    ]);
    let snap = shared.guard.snapshot();
    let clients = clients_of(shared);
    let circuit = format!("{:?}", snap.circuit).to_lowercase();
    for p in sorted_pools(shared) {
        let st = p.pool.state();
        let mine = clients.get(&p.label).map(Vec::as_slice).unwrap_or_default();
        let waiting: Vec<Duration> = mine.iter().filter_map(|e| e.queued_for()).collect();
        let max_wait = waiting.iter().max().copied().unwrap_or_default();
        let active = st.connections.saturating_sub(st.idle_connections) as usize;
        let g = snap.pools.get(&*p.label);
        let leased = g.map_or(0, |g| g.leased);
        let t = p.stats.totals();
        rs.row(vec![
            p.database.as_str().into(),
            p.user.as_str().into(),
            (mine.len() - waiting.len()).into(),
            waiting.len().into(),
            0usize.into(),
            0usize.into(),
            active.into(),
            0usize.into(),
            mine.iter().filter(|e| e.cancel_in_flight()).count().into(),
            (st.idle_connections as usize).into(),
            0usize.into(),
            0usize.into(),
            // Leases whose connection is still being opened.
            leased.saturating_sub(active).into(),
            Val::Int(max_wait.as_secs() as i64),
            Val::Int(max_wait.subsec_micros() as i64),
            mode_name(p.mode).into(),
            Val::Null,
            g.map_or(0, |g| g.active).into(),
            g.map_or(0, |g| g.queued).into(),
            g.map_or(snap.limit, |g| g.limit).into(),
            p.capacity.into(),
            t.sheds.into(),
            t.cancels.into(),
            circuit.as_str().into(),
        ]);
    }
    rs
}

fn sorted_pools(shared: &Shared) -> Vec<Arc<PoolEntry>> {
    let mut v = shared.pools.all();
    v.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
    v
}

const SOCKET_COLS: [(&str, Ty); 21] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int4),
    ("id", Int8),
];

fn tls_col(tls: bool) -> Val {
    if tls {
        "TLS".into()
    } else {
        Val::Null
    }
}

pub fn clients(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&SOCKET_COLS);
    for e in shared.cancels.all() {
        let c = &e.client;
        let (running, started) = e.activity();
        let waited = e.queued_for();
        let state = if waited.is_some() {
            "waiting"
        } else {
            "active"
        };
        let wait = waited.unwrap_or_default();
        let (a, p) = addr(c.peer);
        let (la, lp) = addr(c.local);
        rs.row(vec![
            "C".into(),
            c.user.as_str().into(),
            c.database.as_str().into(),
            "none".into(),
            state.into(),
            a,
            p,
            la,
            lp,
            stamp(c.connected).into(),
            stamp(started.map_or(c.connected, wall)).into(),
            Val::Int(wait.as_secs() as i64),
            Val::Int(wait.subsec_micros() as i64),
            Val::Int(0),
            format!("{:x}", e.pid).into(),
            running.map(|t| format!("{:x}", t.pid)).into(),
            Val::Int(0),
            tls_col(c.tls),
            c.application_name.as_str().into(),
            Val::Int(0),
            Val::Int(e.pid as i64),
        ]);
    }
    rs
}

pub fn servers(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&SOCKET_COLS);
    for p in sorted_pools(shared) {
        for s in p.servers.all() {
            let link = s.link;
            let (a, port) = addr(Some(s.addr));
            let (la, lp) = addr(s.local);
            rs.row(vec![
                "S".into(),
                p.user.as_str().into(),
                p.database.as_str().into(),
                "none".into(),
                if link.is_some() { "active" } else { "idle" }.into(),
                a,
                port,
                la,
                lp,
                stamp(s.connected).into(),
                stamp(s.connected).into(),
                Val::Int(0),
                Val::Int(0),
                Val::Int(0),
                format!("{:x}", s.pid).into(),
                link.map(|c| format!("{c:x}")).into(),
                Val::Int(s.pid as i64),
                tls_col(s.tls),
                Val::Null,
                Val::Int(0),
                Val::Int(s.pid as i64),
            ]);
        }
    }
    rs
}

pub fn databases(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int4),
        ("min_pool_size", Int4),
        ("reserve_pool_size", Int4),
        ("server_lifetime", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int4),
        ("current_connections", Int4),
        ("max_client_connections", Int4),
        ("current_client_connections", Int4),
        ("paused", Int4),
        ("disabled", Int4),
    ]);
    let cfg = shared.config();
    let paused = shared.guard.is_paused();
    let clients = clients_of(shared);
    // Per name: upstream database, pool size, server connections, clients.
    let mut dbs: BTreeMap<String, (String, usize, usize, usize)> = BTreeMap::new();
    for p in shared.pools.all() {
        let e = dbs.entry(p.database.clone()).or_default();
        e.0.clone_from(&p.upstream_database);
        e.1 = p.capacity;
        e.2 += p.pool.state().connections as usize;
        e.3 += clients.get(&p.label).map_or(0, Vec::len);
    }
    // Configured names without a pool yet are listed too, as PgBouncer lists its [databases].
    for (name, d) in &cfg.databases {
        dbs.entry(name.clone()).or_insert_with(|| {
            let upstream = d.dbname.clone().unwrap_or_else(|| name.clone());
            (upstream, d.pool_size.unwrap_or(cfg.pool_size), 0, 0)
        });
    }
    // Where the database's new server connections go now: the primary with several hosts.
    let topology = shared.pools.topology();
    for (db, (upstream_db, pool_size, servers, clients)) in dbs {
        let route = crate::upstream::Route::of_database(&db).1;
        let host = topology
            .candidates(route)
            .ok()
            .and_then(|c| c.first().copied())
            .map_or(cfg.upstream.first(), |i| &topology.host(i).addr);
        let own = cfg.databases.get(&db);
        let mode = own.and_then(|d| d.pool_mode).unwrap_or(cfg.pool_mode);
        let paused = paused || shared.guard.is_database_paused(&db);
        rs.row(vec![
            db.as_str().into(),
            host.host.as_str().into(),
            Val::Int(host.port as i64),
            upstream_db.as_str().into(),
            Val::Null,
            pool_size.into(),
            0usize.into(),
            0usize.into(),
            Val::Int(cfg.server_lifetime.map_or(0, |d| d.as_secs() as i64)),
            mode_name(mode).into(),
            Val::Null,
            Val::Int(0),
            servers.into(),
            Val::Int(0),
            clients.into(),
            paused.into(),
            false.into(),
        ]);
    }
    rs
}

pub fn users(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Text),
        ("pool_size", Text),
        ("reserve_pool_size", Text),
        ("pool_mode", Text),
        ("max_user_connections", Int4),
        ("current_connections", Int4),
        ("max_user_client_connections", Int4),
        ("current_client_connections", Int4),
    ]);
    let clients = clients_of(shared);
    let mut users: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in shared.pools.all() {
        let e = users.entry(p.user.clone()).or_default();
        e.0 += p.pool.state().connections as usize;
        e.1 += clients.get(&p.label).map_or(0, Vec::len);
    }
    let cfg = shared.config();
    for (user, (servers, clients)) in users {
        let own = cfg.user_settings.get(&user);
        let size = own.and_then(|u| u.pool_size).map(|n| n.to_string());
        let mode = own.and_then(|u| u.pool_mode).map(mode_name);
        rs.row(vec![
            user.into(),
            size.unwrap_or_default().into(),
            "".into(),
            mode.map_or(Val::Null, Val::from),
            Val::Int(0),
            servers.into(),
            Val::Int(0),
            clients.into(),
        ]);
    }
    rs
}

pub fn lists(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[("list", Text), ("items", Int4)]);
    let pools = shared.pools.all();
    let databases: std::collections::BTreeSet<_> = pools.iter().map(|p| &p.database).collect();
    let users: std::collections::BTreeSet<_> = pools.iter().map(|p| &p.user).collect();
    let servers: usize = pools.iter().map(|p| p.servers.len()).sum();
    let clients = shared.cancels.len();
    let logging_in = shared
        .clients_total
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(clients);
    for (name, n) in [
        ("databases", databases.len()),
        ("users", users.len()),
        ("peers", 0),
        ("pools", pools.len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", clients),
        ("login_clients", logging_in),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rs.row(vec![name.into(), n.into()]);
    }
    rs
}

pub fn version() -> ResultSet {
    let mut rs = ResultSet::new(&[("version", Text)]);
    rs.row(vec![
        format!("pgsluice {}", env!("CARGO_PKG_VERSION")).into()
    ]);
    rs
}

pub fn state(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[("key", Text), ("value", Text)]);
    let paused = shared.guard.is_paused();
    let yes = |b: bool| if b { "yes" } else { "no" };
    rs.row(vec!["active".into(), yes(!paused).into()]);
    rs.row(vec!["paused".into(), yes(paused).into()]);
    rs.row(vec!["suspended".into(), "no".into()]);
    rs
}

/// SHOW CONFIG: the running settings, by flag name.
pub fn config(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    let cfg = shared.config();
    let d = |d: Option<Duration>| {
        d.map_or("off".to_string(), |d| {
            humantime::format_duration(d).to_string()
        })
    };
    let rows: Vec<(&str, String, &str)> = vec![
        ("listen", cfg.listen.to_string(), "127.0.0.1:6432"),
        ("upstream", cfg.upstream.label(), ""),
        (
            "admin_listen",
            cfg.admin_listen
                .map_or("off".to_string(), |a| a.to_string()),
            "",
        ),
        ("pool_mode", pool_mode(shared).to_string(), "transaction"),
        ("pool_size", cfg.pool_size.to_string(), "20"),
        ("max_active", cfg.max_active.to_string(), "pool_size"),
        ("max_queue", cfg.max_queue.to_string(), "1000"),
        ("queue_timeout", d(Some(cfg.queue_timeout)), "5s"),
        ("query_timeout", d(cfg.query_timeout), "off"),
        (
            "idle_in_transaction_timeout",
            d(cfg.idle_in_transaction_timeout),
            "off",
        ),
        ("max_client_conn", cfg.max_client_conn.to_string(), "10000"),
        ("threads", cfg.threads.to_string(), "0"),
        ("server_lifetime", d(cfg.server_lifetime), "1h"),
        ("server_idle_timeout", d(cfg.server_idle_timeout), "10m"),
        ("connect_timeout", d(Some(cfg.connect_timeout)), "5s"),
        ("cancel_grace", d(Some(cfg.cancel_grace)), "5s"),
        ("health_interval", d(Some(cfg.health_interval)), "1s"),
        (
            "host_check_interval",
            d(Some(cfg.host_check_interval)),
            "250ms",
        ),
        (
            "max_replica_lag",
            cfg.max_replica_lag.map_or("0".into(), |b| b.to_string()),
            "0",
        ),
        ("breaker_threshold", cfg.breaker_threshold.to_string(), "5"),
        ("breaker_cooldown", d(Some(cfg.breaker_cooldown)), "500ms"),
        (
            "breaker_max_cooldown",
            d(Some(cfg.breaker_max_cooldown)),
            "30s",
        ),
        (
            "max_prepared_statements",
            cfg.max_prepared_statements.to_string(),
            "200",
        ),
        ("admin_users", cfg.admin_users.join(","), ""),
        ("stats_users", cfg.stats_users.join(","), ""),
    ];
    for (k, v, def) in rows {
        let changeable = super::SETTABLE.contains(&k);
        rs.row(vec![
            k.into(),
            v.into(),
            def.into(),
            if changeable { "yes" } else { "no" }.into(),
        ]);
    }
    rs
}

/// SHOW GUARD: the admission guard, one row per pool and one for the whole upstream.
pub fn guard(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("pool", Text),
        ("active", Int4),
        ("limit", Int4),
        ("queued", Int4),
        ("leased", Int4),
        ("capacity", Int4),
        ("paused", Int4),
        ("circuit", Text),
        ("standing_queue", Int4),
        ("admitted_cohorts", Int4),
        ("cohorts", Int4),
    ]);
    let s = shared.guard.snapshot();
    let circuit = format!("{:?}", s.circuit).to_lowercase();
    let upstream = format!("upstream {}", s.upstream);
    let leased: usize = s.pools.values().map(|p| p.leased).sum();
    let capacity: usize = s.pools.values().map(|p| p.capacity).sum();
    let mut row = |name: &str, active, queued, leased, capacity| {
        rs.row(vec![
            name.into(),
            Val::UInt(active as u64),
            s.limit.into(),
            Val::UInt(queued as u64),
            Val::UInt(leased as u64),
            Val::UInt(capacity as u64),
            s.paused.into(),
            circuit.as_str().into(),
            s.standing_queue.into(),
            s.admitted_cohorts.into(),
            s.cohorts.into(),
        ]);
    };
    row(&upstream, s.active, s.queued, leased, capacity);
    for (name, p) in &s.pools {
        row(name, p.active, p.queued, p.leased, p.capacity);
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(stamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_212_800 + 3_661);
        assert_eq!(stamp(t), "2026-12-02 13:01:01 UTC");
        // A leap day.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(stamp(t), "2000-02-29 00:00:00 UTC");
    }
}
