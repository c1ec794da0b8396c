//! `SHOW STATS`, `SHOW STATS_TOTALS`, `SHOW STATS_AVERAGES` and `SHOW TOTALS`: the per-pool
//! counters summed per database, in PgBouncer's columns.

use super::rows::{ResultSet, Ty, Val};
use crate::pool::stats::Totals;
use crate::state::Shared;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use Ty::{Numeric, Text};

/// Totals now, at the averaging mark, and the time between, summed per database.
fn per_database(shared: &Shared) -> BTreeMap<String, (Totals, Totals, Duration)> {
    let now = Instant::now();
    let mut out: BTreeMap<String, (Totals, Totals, Duration)> = BTreeMap::new();
    for p in shared.pools.all() {
        let (cur, old, dur) = p.stats.with_mark(now);
        let e = out.entry(p.database.clone()).or_default();
        e.0.add(&cur);
        e.1.add(&old);
        e.2 = e.2.max(dur);
    }
    out
}

const STAT_NAMES: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "received",
    "sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_login_count",
];

fn values(t: &Totals) -> [u64; 12] {
    [
        t.server_assignments,
        t.xacts,
        t.queries,
        t.received,
        t.sent,
        t.xact_us,
        t.query_us,
        t.wait_us,
        t.client_parses,
        t.server_parses,
        t.binds,
        t.logins,
    ]
}

/// PgBouncer's SHOW STATS columns (bytes are `total_received` but `avg_recv`).
const STATS_COLS: [(&str, Ty); 25] = [
    ("database", Text),
    ("total_server_assignment_count", Numeric),
    ("total_xact_count", Numeric),
    ("total_query_count", Numeric),
    ("total_received", Numeric),
    ("total_sent", Numeric),
    ("total_xact_time", Numeric),
    ("total_query_time", Numeric),
    ("total_wait_time", Numeric),
    ("total_client_parse_count", Numeric),
    ("total_server_parse_count", Numeric),
    ("total_bind_count", Numeric),
    ("total_client_login_count", Numeric),
    ("avg_server_assignment_count", Numeric),
    ("avg_xact_count", Numeric),
    ("avg_query_count", Numeric),
    ("avg_recv", Numeric),
    ("avg_sent", Numeric),
    ("avg_xact_time", Numeric),
    ("avg_query_time", Numeric),
    ("avg_wait_time", Numeric),
    ("avg_client_parse_count", Numeric),
    ("avg_server_parse_count", Numeric),
    ("avg_bind_count", Numeric),
    ("avg_client_login_count", Numeric),
];

pub fn stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&STATS_COLS);
    for (db, (cur, old, dur)) in per_database(shared) {
        let mut row: Vec<Val> = vec![db.into()];
        row.extend(values(&cur).into_iter().map(Val::UInt));
        row.extend(values(&cur.average(&old, dur)).into_iter().map(Val::UInt));
        rs.row(row);
    }
    rs
}

/// SHOW STATS_TOTALS and SHOW STATS_AVERAGES share PgBouncer's column names.
pub fn stats_totals(shared: &Shared, averages: bool) -> ResultSet {
    let mut cols = vec![("database", Text)];
    let names: [&'static str; 12] = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        if averages {
            "avg_client_parse_count"
        } else {
            "client_parse_count"
        },
        if averages {
            "avg_server_parse_count"
        } else {
            "server_parse_count"
        },
        if averages {
            "avg_bind_count"
        } else {
            "bind_count"
        },
        if averages {
            "avg_client_login_count"
        } else {
            "client_login_count"
        },
    ];
    cols.extend(names.iter().map(|n| (*n, Numeric)));
    let mut rs = ResultSet::new(&cols);
    for (db, (cur, old, dur)) in per_database(shared) {
        let t = if averages {
            cur.average(&old, dur)
        } else {
            cur
        };
        let mut row: Vec<Val> = vec![db.into()];
        row.extend(values(&t).into_iter().map(Val::UInt));
        rs.row(row);
    }
    rs
}

/// SHOW TOTALS: the totals and averages over every pool, one per row.
pub fn totals(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[("name", Text), ("value", Numeric)]);
    let (mut cur, mut old, mut dur) = (Totals::default(), Totals::default(), Duration::ZERO);
    for (c, o, d) in per_database(shared).into_values() {
        cur.add(&c);
        old.add(&o);
        dur = dur.max(d);
    }
    let avg = cur.average(&old, dur);
    for (prefix, t) in [("total_", &cur), ("avg_", &avg)] {
        for (name, v) in STAT_NAMES.iter().zip(values(t)) {
            let name = match *name {
                "received" => "client_bytes",
                "sent" => "server_bytes",
                n => n,
            };
            rs.row(vec![format!("{prefix}{name}").into(), Val::UInt(v)]);
        }
    }
    rs
}
