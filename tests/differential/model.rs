//! What one client knows about the database and its session: the exact values of the rows it
//! owns (or the few states they may be in after an answer that never came), its COPY batches,
//! its large row, its prepared statements and its session parameters.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::script::Script;

/// Rows each client owns in `diff_rows`.
pub const K: usize = 4;

/// Session parameters the tester sets, resets and reads back, with values spelled as SHOW
/// prints them. All are tracked by the proxy in transaction mode. `application_name` gets
/// values made up per client.
pub const PARAMS: &[(&str, &[&str])] = &[
    (
        "DateStyle",
        &[
            "ISO, MDY",
            "ISO, DMY",
            "SQL, DMY",
            "Postgres, MDY",
            "German, DMY",
        ],
    ),
    (
        "IntervalStyle",
        &["postgres", "postgres_verbose", "sql_standard", "iso_8601"],
    ),
    (
        "TimeZone",
        &["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"],
    ),
    (
        "search_path",
        &["public", "public, pg_catalog", "\"$user\", public"],
    ),
    ("application_name", &[]),
    ("statement_timeout", &["0", "30s", "1h"]),
    ("extra_float_digits", &["1", "0", "2", "-1"]),
    ("bytea_output", &["hex", "escape"]),
    ("lock_timeout", &["0", "20s"]),
    (
        "default_transaction_isolation",
        &["read committed", "repeatable read"],
    ),
];

/// Parameters PostgreSQL reports with ParameterStatus; the client's view must follow them.
pub const REPORTED: &[&str] = &["DateStyle", "IntervalStyle", "TimeZone", "application_name"];

/// Untracked settings: only RESET (harmless, and must not disturb tracked ones) or SET LOCAL.
pub const UNTRACKED: &[&str] = &["enable_seqscan", "work_mem", "enable_hashjoin"];

/// What a COPY batch holds: certain, or nothing-or-everything when its end was not seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: i64,
    pub sum: i64,
    pub certain: bool,
}

pub struct Model {
    pub cid: u32,
    pub ctr: u64,
    /// The state of the owned rows, unless `alts` is non-empty: then it is one of
    /// `rows` and `alts` (all or nothing per operation).
    pub rows: Vec<i64>,
    pub alts: Vec<Vec<i64>>,
    pub copies: BTreeMap<u32, Batch>,
    pub next_batch: u32,
    /// Possible (seq, length) of the large row; empty before the first write.
    pub big: Vec<(i64, usize)>,
    pub big_seq: i64,
    /// Session state of the current connection.
    pub stmts: BTreeMap<String, u32>,
    pub params: BTreeMap<&'static str, String>,
    pub startup: BTreeMap<&'static str, String>,
    pub defaults: Arc<BTreeMap<&'static str, String>>,
    pub names: u64,
}

/// A session's prepared statements (name to version) and parameter values.
pub type Session = (BTreeMap<String, u32>, BTreeMap<&'static str, String>);

/// A script and what it does to the model if it completes, or may have done if its commit
/// point was sent but no answer came.
pub struct Plan {
    pub script: Script,
    pub rows_after: Option<Vec<i64>>,
    pub copy: Option<(u32, Batch)>,
    pub big_after: Option<(i64, usize)>,
    /// The session's prepared statements and parameters after success.
    pub session_after: Option<Session>,
    /// Resolves `rows`/`alts` from the first matched DataRow (a verify).
    pub resolves_rows: bool,
    pub resolves_big: bool,
}

impl Plan {
    pub fn new(script: Script) -> Plan {
        Plan {
            script,
            rows_after: None,
            copy: None,
            big_after: None,
            session_after: None,
            resolves_rows: false,
            resolves_big: false,
        }
    }
}

impl Model {
    pub fn new(cid: u32, defaults: Arc<BTreeMap<&'static str, String>>) -> Model {
        Model {
            cid,
            ctr: 0,
            rows: vec![0; K],
            alts: Vec::new(),
            copies: BTreeMap::new(),
            next_batch: 0,
            big: Vec::new(),
            big_seq: 0,
            stmts: BTreeMap::new(),
            params: BTreeMap::new(),
            startup: BTreeMap::new(),
            defaults,
            names: 0,
        }
    }

    pub fn tick(&mut self) -> u64 {
        self.ctr += 1;
        self.ctr
    }

    /// A fresh application_name for this client.
    pub fn app_name(&mut self) -> String {
        self.names += 1;
        format!("diff_c{}_{}", self.cid, self.names)
    }

    pub fn random_value(&mut self, rng: &mut StdRng, name: &str) -> String {
        let values = PARAMS.iter().find(|(n, _)| *n == name).unwrap().1;
        if values.is_empty() {
            return self.app_name();
        }
        values.choose(rng).unwrap().to_string()
    }

    /// A new session: random startup parameters, no statements.
    pub fn new_session(&mut self, rng: &mut StdRng) -> Vec<(String, String)> {
        self.stmts.clear();
        self.startup.clear();
        let mut out = Vec::new();
        for (name, _) in PARAMS {
            if rng.gen_bool(0.25) {
                let v = self.random_value(rng, name);
                out.push((name.to_string(), v.clone()));
                self.startup.insert(name, v);
            }
        }
        self.params = self.startup.clone();
        out
    }

    /// What RESET gives: the startup value, else the server's default.
    pub fn reset_value(&self, name: &'static str) -> String {
        self.startup
            .get(name)
            .or_else(|| self.defaults.get(name))
            .cloned()
            .unwrap_or_default()
    }

    pub fn value(&self, name: &'static str) -> String {
        self.params
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.reset_value(name))
    }

    /// Every state the owned rows may be in, as `diff_rows` aggregates them.
    pub fn row_states(&self) -> Vec<String> {
        std::iter::once(&self.rows)
            .chain(self.alts.iter())
            .map(|r| rows_text(r))
            .collect()
    }

    pub fn resolve_rows(&mut self, seen: &str) -> bool {
        let states: Vec<Vec<i64>> = std::iter::once(self.rows.clone())
            .chain(self.alts.drain(..))
            .collect();
        match states.into_iter().find(|s| rows_text(s) == seen) {
            Some(s) => {
                self.rows = s;
                true
            }
            None => false,
        }
    }
}

pub fn rows_text(r: &[i64]) -> String {
    r.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The large row's payload for (client, seq, length): reproducible, and different for every
/// client and version, so a row read from the wrong place cannot match.
pub fn payload(cid: u32, seq: i64, len: usize) -> Vec<u8> {
    let unit = format!("c{cid}s{seq}.");
    unit.as_bytes().iter().copied().cycle().take(len).collect()
}

/// SET syntax for a value: list settings take their elements unquoted.
pub fn set_literal(name: &str, value: &str) -> String {
    if name == "search_path" {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}
