//! Session parameters under transaction pooling. A client's server connection changes
//! between transactions, so the settings drivers rely on (startup parameters, `SET`) are
//! kept per client and replayed: each client has a desired value for every tracked
//! parameter, each server connection remembers what was applied to it, and when a batch is
//! about to run on a server whose state differs, one injected simple Query (pipelined
//! ahead of the batch, its responses removed from the stream) brings the server to the
//! client's state. Values are learned from ParameterStatus (reported parameters) and, after
//! a transaction that may have changed one (`SET`, `RESET`, `DISCARD`, `set_config`), from
//! one read-back query once the transaction has ended.

mod hooks;
pub mod sql;

pub use hooks::{needs_check, read_back, resolve};
pub use sql::{from_startup, Hit};

use crate::protocol::{self, ScanEvent};
use std::sync::Arc;

/// The tracked parameters, in PostgreSQL's spelling (names compare case-insensitively).
pub const TRACKED: [&str; 14] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "standard_conforming_strings",
    "bytea_output",
    "default_transaction_isolation",
    "default_transaction_read_only",
];

pub const APPLICATION_NAME: usize = 0;
pub const STATEMENT_TIMEOUT: usize = 7;

/// Position of a tracked parameter.
pub fn index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

/// Defined with the server connection that carries it (`pool::conn_state`).
pub use crate::pool::conn_state::ParamSet;

impl ParamSet {
    fn find(&self, i: usize) -> Result<usize, usize> {
        self.0.binary_search_by_key(&i, |e| e.0 as usize)
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        self.find(i).ok().map(|p| &*self.0[p].1)
    }

    pub fn set(&mut self, i: usize, v: Option<&str>) {
        debug_assert!(i < TRACKED.len());
        match (self.find(i), v) {
            (Ok(p), Some(v)) if &*self.0[p].1 != v => self.0[p].1 = Arc::from(v),
            (Ok(_), Some(_)) => {}
            (Ok(p), None) => {
                self.0.remove(p);
            }
            (Err(p), Some(v)) => self.0.insert(p, (i as u8, Arc::from(v))),
            (Err(_), None) => {}
        }
    }
}

/// How a client's parameters are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Nothing tracked or replayed.
    #[default]
    Off,
    /// Startup values are applied to the client's (own) server; changes are not followed.
    Session,
    /// Startup values and changes are followed and replayed on every server.
    Transaction,
}

/// One client's parameter state, kept with its relay state.
#[derive(Default, Debug)]
pub struct Tracker {
    pub mode: Mode,
    /// Validated startup values (what `RESET` returns to for this client).
    startup: ParamSet,
    /// What the client's session should look like now.
    pub current: ParamSet,
    /// A statement that may change a parameter ran: read values back when the
    /// transaction is over.
    dirty: bool,
    /// ParameterStatus changed `current` since the server was last settled.
    changed: bool,
    /// ReadyForQuery messages still owed for injected queries; everything up to and
    /// including them is removed from the stream.
    strip: u16,
    /// An injected query failed.
    sync_failed: bool,
    /// Parameters that returned to their startup value after a RESET (bit per position):
    /// the server told the client its own default, so the proxy tells it the value again.
    announce: u16,
    /// Client statement names whose text may change a setting (extended protocol).
    set_stmts: Vec<(Vec<u8>, Hit)>,
    /// What a fresh server connection reports for each parameter (its reset values).
    /// Boxed: sessions in session mode, most of them, never use it.
    defaults: Option<Box<ParamSet>>,
    /// Parameters whose ParameterStatus was rewritten to the startup value (bit per
    /// position) since the last read-back.
    rewritten: u16,
    /// Parameters RESET by the client's current batch (bit per position): a ParameterStatus
    /// giving the server's default is that RESET's, and the client is told its startup
    /// value instead, before the batch's ReadyForQuery.
    reset_now: u16,
}

impl Tracker {
    pub fn new(mode: Mode, startup: ParamSet) -> Self {
        Tracker {
            mode,
            current: startup.clone(),
            startup,
            ..Default::default()
        }
    }

    /// The client's `statement_timeout` when the proxy is sure of it: changes are followed
    /// (transaction mode), none awaits a read-back, and the client set one (at startup or
    /// with SET). The server's own default is not known here: `None`.
    pub fn statement_timeout(&self) -> Option<std::time::Duration> {
        if !self.following() || self.dirty {
            return None;
        }
        parse_ms(self.current.get(STATEMENT_TIMEOUT)?)
    }

    pub fn startup_value(&self, name: &str) -> Option<&str> {
        index(name).and_then(|i| self.startup.get(i))
    }

    fn following(&self) -> bool {
        self.mode == Mode::Transaction
    }

    /// A client Query, Parse, Bind or Close: `body` when captured, else `whole` (the
    /// entire message, when it lies in one read).
    pub fn on_client_msg(&mut self, tag: u8, body: Option<&[u8]>, whole: Option<&[u8]>) {
        if !self.following() || matches!(tag, b'B' | b'C') && self.set_stmts.is_empty() {
            return;
        }
        let Some(body) = body.or_else(|| whole.map(|w| &w[5.min(w.len())..])) else {
            // A large message spread over several reads: read values back to be sure.
            self.mark(Hit::Set);
            return;
        };
        match tag {
            b'Q' => {
                let text = cstr(body).0;
                self.mark(sql::classify(text));
                self.reset_now |= sql::reset_targets(text);
            }
            b'P' => {
                let (name, rest) = cstr(body);
                let hit = sql::classify(cstr(rest).0);
                // A prepared SET changes settings each time it is executed.
                self.set_stmts.retain(|(n, _)| n.as_slice() != name);
                if hit != Hit::None {
                    self.set_stmts.push((name.to_vec(), hit));
                }
                self.mark(hit);
            }
            b'B' => {
                let name = cstr(cstr(body).1).0;
                if let Some(&(_, hit)) = self.set_stmts.iter().find(|(n, _)| n.as_slice() == name) {
                    self.mark(hit);
                }
            }
            _ => {
                if let Some((b'S', rest)) = body.split_first() {
                    let name = cstr(rest).0;
                    self.set_stmts.retain(|(n, _)| n.as_slice() != name);
                }
            }
        }
    }

    fn mark(&mut self, hit: Hit) {
        self.dirty |= hit != Hit::None;
    }

    /// Records what a fresh server connection reports (`server`: its ParameterStatus set).
    pub fn set_defaults(&mut self, server: &[(String, String)]) {
        let mut d = ParamSet::default();
        for (k, v) in server {
            if let Some(i) = index(k) {
                d.set(i, Some(v));
            }
        }
        self.defaults = Some(Box::new(d));
    }

    fn default_value(&self, i: usize) -> Option<&str> {
        self.defaults.as_ref().and_then(|d| d.get(i))
    }

    /// A ParameterStatus from the server during the client's batches. Returns the value
    /// the client is to be told instead of the server's: after a RESET the server reports
    /// its own default, while the client's value is its startup value (as PostgreSQL would
    /// report it directly); the server's record keeps the server's value.
    pub fn on_status(&mut self, body: &[u8]) -> Option<&str> {
        if !self.following() {
            return None;
        }
        let (name, rest) = cstr(body);
        let value = cstr(rest).0;
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return None;
        };
        let i = index(name)?;
        if self.current.get(i) != Some(value) {
            self.current.set(i, Some(value));
            self.changed = true;
        }
        let reset = self.reset_now & (1 << i) != 0
            && self.default_value(i) == Some(value)
            && self.startup.get(i).is_some_and(|s| s != value);
        if reset {
            self.rewritten |= 1 << i;
            self.startup.get(i)
        } else {
            self.rewritten &= !(1 << i);
            None
        }
    }

    /// The client's batch got a ReadyForQuery: ParameterStatus messages to put ahead of it
    /// for parameters the batch RESET that the client was not told its startup value of
    /// (the server reports nothing when its value did not change, e.g. after an explicit
    /// SET to the server's default).
    pub fn before_ready(&mut self, out: &mut bytes::BytesMut) {
        if !self.following() || self.reset_now == 0 {
            return;
        }
        let targets = std::mem::take(&mut self.reset_now);
        for (i, name) in TRACKED.iter().enumerate() {
            let Some(start) = self.startup.get(i) else {
                continue;
            };
            if targets & (1 << i) == 0 || self.default_value(i).is_none() {
                continue;
            }
            let told = if self.rewritten & (1 << i) != 0 {
                Some(start)
            } else {
                self.current.get(i)
            };
            if told != Some(start) {
                protocol::parameter_status(out, name, start);
                self.rewritten |= 1 << i;
            }
        }
    }

    /// The batch's RESETs may not have taken effect (an error): tell nothing before its
    /// ReadyForQuery; the read-back decides.
    pub fn before_ready_skip(&mut self) {
        self.reset_now = 0;
    }

    pub fn stripping(&self) -> bool {
        self.strip > 0
    }

    /// Injected batches whose ReadyForQuery is still owed (the client is not waiting on them).
    pub fn injected_owed(&self) -> usize {
        usize::from(self.strip)
    }

    /// An injected query is on its way to the server.
    pub fn injected(&mut self) {
        self.strip = self.strip.saturating_add(1);
    }

    /// A message answering an injected query, to be removed: keeps the relay's batch
    /// count, transaction status and fatal flag right and returns the message's absolute
    /// range (`at`: where the scanned chunk starts).
    pub fn strip_message(
        &mut self,
        ev: &ScanEvent<'_>,
        at: usize,
        pending: &mut usize,
        status: &mut u8,
        fatal: &mut bool,
    ) -> Option<(usize, usize)> {
        match (ev.tag, ev.body) {
            (b'Z', body) => {
                self.strip = self.strip.saturating_sub(1);
                *pending = pending.saturating_sub(1);
                if let Some(&[s]) = body {
                    *status = s;
                }
            }
            (b'E', body) => {
                self.sync_failed = true;
                if let Some(body) = body {
                    let f = protocol::parse_error_fields(body);
                    *fatal |= f.severity == "FATAL" || f.severity == "PANIC";
                }
            }
            _ => {}
        }
        let end = at + ev.end;
        // None when the message began in bytes already cut from the buffer.
        end.checked_sub(5 + ev.len).map(|start| (start, end))
    }

    pub fn take_sync_failed(&mut self) -> bool {
        std::mem::take(&mut self.sync_failed)
    }

    /// The server was lost: nothing more will answer the injected queries.
    pub fn abandon(&mut self) {
        self.strip = 0;
        self.sync_failed = false;
    }

    pub fn needs_read_back(&self) -> bool {
        self.dirty
    }

    /// The server's state may differ from what the proxy recorded for it.
    pub fn unsettled(&self) -> bool {
        self.dirty || self.changed
    }

    /// The transaction ended without a read-back: the new state of the server, if it moved.
    pub fn settle(&mut self) -> Option<ParamSet> {
        std::mem::take(&mut self.changed).then(|| self.current.clone())
    }

    /// Takes the values read back from the server (`None` where nothing is SET, see
    /// `read_back`) and returns them as the server's recorded state. A parameter not SET
    /// there was RESET (or SET TO DEFAULT) by the client, since every batch starts with the
    /// client's values applied: it returns to the client's startup value, as in
    /// PostgreSQL, which the next batch then applies.
    pub fn apply_read_back(&mut self, actual: ParamSet) -> ParamSet {
        let rewritten = std::mem::take(&mut self.rewritten);
        for i in 0..TRACKED.len() {
            let new = actual.get(i).or(self.startup.get(i));
            // What the client was last told: the startup value where a ParameterStatus was
            // rewritten, else the value the server reported (or the proxy announced).
            let told = if rewritten & (1 << i) != 0 {
                self.startup.get(i)
            } else {
                self.current.get(i)
            };
            let back = actual.get(i).is_none() && self.startup.get(i).is_some();
            if (back || rewritten & (1 << i) != 0) && told != new {
                self.announce |= 1 << i;
            }
            self.current.set(i, new);
        }
        self.dirty = false;
        self.changed = false;
        actual
    }

    /// Parameters back at their startup value since the client was last told otherwise.
    pub fn take_announce(&mut self) -> impl Iterator<Item = (usize, &str)> {
        let a = std::mem::take(&mut self.announce);
        (0..TRACKED.len())
            .filter(move |i| a & (1 << i) != 0)
            .filter_map(|i| self.current.get(i).map(|v| (i, v)))
    }

    /// Nothing to read back any more (tests: a fresh start between steps).
    #[cfg(test)]
    pub fn forget_dirty(&mut self) {
        self.dirty = false;
        self.changed = false;
        self.rewritten = 0;
        self.reset_now = 0;
    }
}

/// A time setting as PostgreSQL spells it: milliseconds without a unit (`pg_settings`),
/// else with one (`SHOW`: "1500ms", "7s", "5min"). `None` for 0 (off) or anything else.
pub fn parse_ms(v: &str) -> Option<std::time::Duration> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "us" => n / 1000.0,
        "s" => n * 1e3,
        "min" => n * 60e3,
        "h" => n * 3600e3,
        "d" => n * 86400e3,
        _ => return None,
    };
    // PostgreSQL caps it at INT_MAX ms (about 25 days).
    (ms > 0.0 && ms < 1e10).then(|| std::time::Duration::from_secs_f64(ms / 1000.0))
}

/// Splits a NUL-terminated string off `buf` (all of it when there is no NUL).
fn cstr(buf: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(0, buf) {
        Some(n) => (&buf[..n], &buf[n + 1..]),
        None => (buf, &[]),
    }
}

/// Startup values as a set: validated (`canonical`) values, except that one equal to what
/// a fresh server connection reports anyway is left at the server default, so clients
/// that send the usual values never cause anything to be injected.
pub fn startup_set(canonical: &[(usize, String)], server: &[(String, String)]) -> ParamSet {
    let mut set = ParamSet::default();
    for (i, v) in canonical {
        let same = server
            .iter()
            .any(|(k, sv)| k.eq_ignore_ascii_case(TRACKED[*i]) && sv == v);
        set.set(*i, (!same).then_some(v.as_str()));
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        format!("{name}\0{value}\0").into_bytes()
    }

    #[test]
    fn statement_timeout_spellings() {
        let ms = |v: &str| parse_ms(v).map(|d| d.as_millis());
        assert_eq!(ms("4321"), Some(4321));
        assert_eq!(ms("1500ms"), Some(1500));
        assert_eq!(ms("7s"), Some(7000));
        assert_eq!(ms("5min"), Some(300_000));
        assert_eq!(ms("1h"), Some(3_600_000));
        assert_eq!(ms("0"), None);
        assert_eq!(ms("soon"), None);
        assert_eq!(ms("3 weeks"), None);
        assert_eq!(TRACKED[STATEMENT_TIMEOUT], "statement_timeout");
        let mut set = ParamSet::default();
        set.set(STATEMENT_TIMEOUT, Some("250ms"));
        let mut t = Tracker::new(Mode::Transaction, set.clone());
        assert_eq!(t.statement_timeout().map(|d| d.as_millis()), Some(250));
        // A SET in flight: not sure until the read-back.
        t.on_client_msg(b'Q', Some(b"SET statement_timeout = 0\0"), None);
        assert_eq!(t.statement_timeout(), None);
        // Session mode follows no SET: never sure.
        assert_eq!(Tracker::new(Mode::Session, set).statement_timeout(), None);
    }

    #[test]
    fn parameter_status_updates_current_once() {
        let mut t = Tracker::new(Mode::Transaction, ParamSet::default());
        t.on_status(&status("TimeZone", "UTC"));
        assert_eq!(t.current.get(index("timezone").unwrap()), Some("UTC"));
        assert!(t.unsettled());
        let s = t.settle().unwrap();
        assert_eq!(s, t.current);
        t.on_status(&status("TimeZone", "UTC"));
        assert!(t.settle().is_none());
        t.on_status(&status("server_version", "15"));
        assert!(t.settle().is_none());
    }

    #[test]
    fn session_mode_follows_nothing() {
        let mut t = Tracker::new(Mode::Session, ParamSet::default());
        t.on_status(&status("TimeZone", "UTC"));
        t.on_client_msg(b'Q', Some(b"SET search_path = x\0"), None);
        assert!(!t.unsettled());
    }

    #[test]
    fn statements_mark_dirty() {
        let mut t = Tracker::new(Mode::Transaction, ParamSet::default());
        t.on_client_msg(b'Q', Some(b"UPDATE t SET x = 1\0"), None);
        assert!(!t.needs_read_back());
        t.on_client_msg(b'P', Some(b"s1\0SET TimeZone TO 'UTC'\0\0\0"), None);
        assert!(t.needs_read_back());
        let mut t = Tracker::new(Mode::Transaction, ParamSet::default());
        t.on_client_msg(b'Q', None, None);
        assert!(t.needs_read_back());
    }

    #[test]
    fn prepared_set_marks_dirty_at_each_bind_until_closed() {
        let mut t = Tracker::new(Mode::Transaction, ParamSet::default());
        t.on_client_msg(b'P', Some(b"s1\0SET lock_timeout = 5\0\0\0"), None);
        t.on_client_msg(b'P', Some(b"s2\0SELECT 1\0\0\0"), None);
        t.forget_dirty();
        t.on_client_msg(b'B', Some(b"\0s2\0\0\0\0\0\0\0"), None);
        assert!(!t.needs_read_back());
        t.on_client_msg(b'B', Some(b"\0s1\0\0\0\0\0\0\0"), None);
        assert!(t.needs_read_back());
        t.forget_dirty();
        t.on_client_msg(b'C', Some(b"Ss1\0"), None);
        t.on_client_msg(b'B', Some(b"\0s1\0\0\0\0\0\0\0"), None);
        assert!(!t.needs_read_back());
    }

    #[test]
    fn reset_returns_to_startup_value() {
        let mut start = ParamSet::default();
        let tz = index("TimeZone").unwrap();
        let sp = index("search_path").unwrap();
        let is = index("IntervalStyle").unwrap();
        start.set(tz, Some("Asia/Tokyo"));
        start.set(is, Some("iso_8601"));
        let mut t = Tracker::new(Mode::Transaction, start);
        t.on_client_msg(b'Q', Some(b"RESET ALL\0"), None);
        let mut actual = ParamSet::default();
        actual.set(sp, Some("x"));
        let server = t.apply_read_back(actual.clone());
        assert_eq!(server, actual);
        assert_eq!(t.current.get(tz), Some("Asia/Tokyo"));
        assert_eq!(t.current.get(sp), Some("x"));
        // SET TO DEFAULT is a RESET in PostgreSQL: back to the startup value.
        t.on_client_msg(b'Q', Some(b"SET TimeZone = DEFAULT\0"), None);
        t.apply_read_back(ParamSet::default());
        assert_eq!(t.current.get(tz), Some("Asia/Tokyo"));
        // A SET to the server's default value is still a SET, whatever is RESET later.
        t.on_client_msg(b'Q', Some(b"SET IntervalStyle = postgres\0"), None);
        let mut actual = ParamSet::default();
        actual.set(is, Some("postgres"));
        t.apply_read_back(actual.clone());
        t.on_client_msg(b'Q', Some(b"RESET enable_seqscan\0"), None);
        t.apply_read_back(actual);
        assert_eq!(t.current.get(is), Some("postgres"));
    }

    #[test]
    fn startup_values_equal_to_the_servers_are_defaults() {
        let server = vec![("client_encoding".to_string(), "UTF8".to_string())];
        let s = startup_set(&[(1, "UTF8".into()), (4, "UTC".into())], &server);
        assert_eq!(s.get(1), None);
        assert_eq!(s.get(4), Some("UTC"));
    }
}
