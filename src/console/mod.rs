//! The admin console: a client that connects to the virtual database `pgsluice` (or
//! `pgbouncer`, so existing tools and fingers work) gets PgBouncer's simple-query console
//! instead of a server: `SHOW POOLS`, `SHOW STATS`, `PAUSE`, `RELOAD`, ...
//!
//! Who may use it: users named in `--admin-users` (every command) and `--stats-users` (SHOW
//! only), after the usual client authentication. With neither set, loopback clients may use
//! it, with every command unless an admin token is configured (a token says that changing
//! the running proxy needs a secret; the console has none beyond the password), else SHOW
//! only. Everyone else is refused at login.

mod hosts;
mod rows;
mod show;
mod stats;

use crate::cancel::ClientInfo;
use crate::config::Config;
use crate::handshake as startup;
use crate::protocol::{self, Severity};
use crate::state::Shared;
use crate::tls::ClientStream;
use bytes::{BufMut, BytesMut};
use rows::ResultSet;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tracing::info;

/// How long `KILL db` waits for its database's server connections to close.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest console message accepted; commands are short.
const MAX_MESSAGE: usize = 64 * 1024;

pub fn is_console(database: &str) -> bool {
    database == "pgsluice" || database == "pgbouncer"
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Admin,
    Stats,
}

fn role(cfg: &Config, c: &ClientInfo) -> Option<Role> {
    if cfg.admin_users.contains(&c.user) {
        return Some(Role::Admin);
    }
    if cfg.stats_users.contains(&c.user) {
        return Some(Role::Stats);
    }
    let loopback = c.peer.is_some_and(|p| p.ip().to_canonical().is_loopback());
    if cfg.admin_users.is_empty() && cfg.stats_users.is_empty() && loopback {
        return Some(if cfg.admin_token.is_some() {
            Role::Stats
        } else {
            Role::Admin
        });
    }
    None
}

/// Serves one console client until it leaves.
pub async fn run(mut client: ClientStream, shared: Arc<Shared>, info: ClientInfo) {
    let cfg = shared.config();
    let Some(role) = role(&cfg, &info) else {
        info!(user = %info.user, "admin console refused");
        let msg = format!(
            "pgsluice: user \"{}\" may not use the admin console (see --admin-users)",
            info.user
        );
        startup::send_fatal(&mut client, "28000", &msg).await;
        return;
    };
    let mut b = BytesMut::with_capacity(256);
    protocol::auth_ok(&mut b);
    for (k, v) in [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/pgsluice"),
        ),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", info.application_name.as_str()),
    ] {
        protocol::parameter_status(&mut b, k, v);
    }
    protocol::ready_for_query(&mut b, b'I');
    if startup::send(&mut client, &b).await.is_err() {
        return;
    }
    // Set by an extended-protocol message; answered with one error at its Sync.
    let mut extended = false;
    let mut body = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if client.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let Some(n) = usize::try_from(len)
            .ok()
            .filter(|n| (4..=MAX_MESSAGE).contains(n))
        else {
            let msg = format!("pgsluice: invalid console message length {len}");
            startup::send_fatal(&mut client, "08P01", &msg).await;
            return;
        };
        body.resize(n - 4, 0);
        if client.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut out = BytesMut::new();
        match head[0] {
            b'Q' => {
                let sql = body.split(|&c| c == 0).next().unwrap_or_default();
                let sql = String::from_utf8_lossy(sql);
                let mut killed = Vec::new();
                let stop = execute(&shared, role, &info, &sql, &mut out, &mut killed);
                for db in killed {
                    // KILL returns once the database's server connections are closed, so
                    // a DROP DATABASE can follow it.
                    let open = shared.close_database_servers(&db, KILL_WAIT).await;
                    if open > 0 {
                        let msg =
                            format!("pgsluice: KILL {db}: {open} server connections still closing");
                        protocol::notice_response(&mut out, "01000", &msg);
                    }
                }
                protocol::ready_for_query(&mut out, b'I');
                if startup::send(&mut client, &out).await.is_err() || stop {
                    return;
                }
            }
            b'X' => return,
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => extended = true,
            b'S' => {
                if std::mem::take(&mut extended) {
                    error(
                        &mut out,
                        "0A000",
                        "pgsluice: the admin console takes simple queries only",
                    );
                }
                protocol::ready_for_query(&mut out, b'I');
                if startup::send(&mut client, &out).await.is_err() {
                    return;
                }
            }
            t => {
                let msg = format!(
                    "pgsluice: unexpected message {:?} on the admin console",
                    t as char
                );
                startup::send_fatal(&mut client, "08P01", &msg).await;
                return;
            }
        }
    }
}

fn error(out: &mut BytesMut, code: &str, msg: &str) {
    protocol::error_response(out, Severity::Error, code, msg, None);
}

/// Splits on `;` outside single quotes.
fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in sql.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Runs every statement of one simple query; stops at the first error. True when the
/// console should close (SHUTDOWN).
/// Databases killed by `KILL db` land in `killed`, for the caller to wait on.
fn execute(
    shared: &Shared,
    role: Role,
    who: &ClientInfo,
    sql: &str,
    out: &mut BytesMut,
    killed: &mut Vec<String>,
) -> bool {
    let stmts = statements(sql);
    if stmts.is_empty() {
        out.put_u8(b'I');
        out.put_i32(4);
        return false;
    }
    for stmt in stmts {
        match command(shared, role, who, stmt, out, killed) {
            Ok(stop) if stop => return true,
            Ok(_) => {}
            Err((code, msg)) => {
                error(out, code, &msg);
                return false;
            }
        }
    }
    false
}

type CmdResult = Result<bool, (&'static str, String)>;

fn command(
    shared: &Shared,
    role: Role,
    who: &ClientInfo,
    stmt: &str,
    out: &mut BytesMut,
    killed: &mut Vec<String>,
) -> CmdResult {
    let words: Vec<String> = stmt
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let verb = words[0].as_str();
    if verb == "SHOW" {
        let what = words.get(1).map(String::as_str).unwrap_or("");
        let rs = show_command(shared, what, out)?;
        if let Some(rs) = rs {
            rs.write(out);
        }
        return Ok(false);
    }
    if role != Role::Admin {
        return Err((
            "42501",
            format!("pgsluice: user \"{}\" may run SHOW commands only", who.user),
        ));
    }
    // Database names keep their case: the words above are upper-cased.
    let arg = stmt.split_whitespace().nth(1).map(|a| a.trim_matches('"'));
    let known = |db: &str| -> Result<(), (&'static str, String)> {
        if crate::console::is_console(db) {
            return Err((
                "42601",
                format!("pgsluice: {verb} {db}: that is the admin console"),
            ));
        }
        if !shared.knows_database(db) {
            return Err(("3D000", format!("pgsluice: no such database: {db}")));
        }
        Ok(())
    };
    match verb {
        "PAUSE" | "RESUME" | "KILL" if words.len() > 2 => {
            Err(("42601", format!("pgsluice: {verb} takes at most one name")))
        }
        "PAUSE" if arg.is_some() => {
            let db = arg.unwrap_or_default();
            known(db)?;
            info!(user = %who.user, database = db, "database paused from the admin console");
            shared.guard.pause_database(db);
            protocol::command_complete(out, "PAUSE");
            Ok(false)
        }
        "RESUME" if arg.is_some() => {
            let db = arg.unwrap_or_default();
            known(db)?;
            info!(user = %who.user, database = db, "database resumed from the admin console");
            shared.guard.resume_database(Some(db));
            protocol::command_complete(out, "RESUME");
            Ok(false)
        }
        "KILL" => {
            let Some(db) = arg else {
                return Err(("42601", "pgsluice: KILL takes a database name".to_string()));
            };
            known(db)?;
            let n = shared.kill_database(db);
            info!(user = %who.user, database = db, clients = n, "database killed from the admin console; it stays paused until RESUME");
            killed.push(db.to_string());
            protocol::command_complete(out, "KILL");
            Ok(false)
        }
        "PAUSE" => {
            info!(user = %who.user, "paused from the admin console");
            shared.pause();
            protocol::command_complete(out, "PAUSE");
            Ok(false)
        }
        "RESUME" => {
            info!(user = %who.user, "resumed from the admin console");
            shared.resume();
            protocol::command_complete(out, "RESUME");
            Ok(false)
        }
        "RELOAD" => {
            shared
                .reload()
                .map_err(|e| ("F0000", format!("pgsluice: reload rejected: {e}")))?;
            protocol::command_complete(out, "RELOAD");
            Ok(false)
        }
        "SHUTDOWN" => {
            info!(user = %who.user, "shutdown requested from the admin console");
            shared.request_stop();
            protocol::command_complete(out, "SHUTDOWN");
            Ok(true)
        }
        "SET" => {
            let (key, value) = parse_set(stmt)?;
            if !SETTABLE.contains(&key.as_str()) {
                return Err(setting_refused(&key));
            }
            shared
                .set(&key, &value)
                .map_err(|e| ("22023", format!("pgsluice: SET {key} rejected: {e}")))?;
            info!(user = %who.user, key, value, "SET from the admin console");
            protocol::command_complete(out, "SET");
            Ok(false)
        }
        "SUSPEND" | "DISABLE" | "ENABLE" | "RECONNECT" | "WAIT_CLOSE" | "KILL_CLIENT" => Err((
            "0A000",
            format!("pgsluice: {verb} is not supported by this console yet"),
        )),
        _ => Err((
            "42601",
            format!("pgsluice: unknown command {verb:?} (try SHOW HELP)"),
        )),
    }
}

/// Settings SET may change (SHOW CONFIG marks them changeable); the rest need a restart.
pub(crate) const SETTABLE: &[&str] = &[
    "pool_size",
    "max_active",
    "max_queue",
    "queue_timeout",
    "query_timeout",
    "idle_in_transaction_timeout",
    "max_client_conn",
    "server_lifetime",
    "server_idle_timeout",
    "connect_timeout",
    "cancel_grace",
    "health_interval",
    "breaker_threshold",
    "breaker_cooldown",
    "breaker_max_cooldown",
    "max_prepared_statements",
    "admin_users",
    "stats_users",
];

/// PgBouncer's names for the same settings, so runbooks keep working.
const PGBOUNCER_NAMES: &[(&str, &str)] = &[
    ("default_pool_size", "pool_size"),
    ("query_wait_timeout", "queue_timeout"),
    ("idle_transaction_timeout", "idle_in_transaction_timeout"),
    ("server_connect_timeout", "connect_timeout"),
];

fn setting_refused(key: &str) -> (&'static str, String) {
    if RESTART_ONLY.contains(&key) {
        (
            "55000",
            format!("pgsluice: {key} cannot be changed while running (restart with the new value)"),
        )
    } else {
        (
            "42704",
            format!("pgsluice: unknown setting {key:?} (SHOW CONFIG lists them)"),
        )
    }
}

/// Settings SHOW CONFIG shows that only a restart changes.
const RESTART_ONLY: &[&str] = &[
    "listen",
    "upstream",
    "admin_listen",
    "pool_mode",
    "threads",
    "host_check_interval",
    "max_replica_lag",
];

/// `SET key = value` or `SET key TO value`; the value may be single-quoted.
fn parse_set(stmt: &str) -> Result<(String, String), (&'static str, String)> {
    let usage = || {
        (
            "42601",
            "pgsluice: expected SET key = value (SHOW CONFIG lists the keys)".to_string(),
        )
    };
    let rest = stmt.get(3..).ok_or_else(usage)?.trim();
    let (key, value) = match rest.split_once('=') {
        Some(kv) => kv,
        None => {
            let lower = rest.to_ascii_lowercase();
            let at = lower.find(" to ").ok_or_else(usage)?;
            (&rest[..at], &rest[at + 4..])
        }
    };
    let key = key.trim().to_ascii_lowercase();
    let value = value.trim();
    if key.is_empty() || key.contains(char::is_whitespace) || value.is_empty() {
        return Err(usage());
    }
    let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => value.to_string(),
    };
    let Some(&(_, ours)) = PGBOUNCER_NAMES.iter().find(|(theirs, _)| *theirs == key) else {
        return Ok((key, value));
    };
    // PgBouncer's timeouts are bare seconds; pgsluice's durations carry a unit.
    let seconds = ours.ends_with("timeout") && value.bytes().all(|b| b.is_ascii_digit());
    let value = if seconds { format!("{value}s") } else { value };
    Ok((ours.to_string(), value))
}

const SHOWS: &[&str] = &[
    "POOLS",
    "HOSTS",
    "STATS",
    "STATS_TOTALS",
    "STATS_AVERAGES",
    "TOTALS",
    "CLIENTS",
    "SERVERS",
    "DATABASES",
    "USERS",
    "CONFIG",
    "LISTS",
    "VERSION",
    "STATE",
    "GUARD",
    "HELP",
];

fn show_command(
    shared: &Shared,
    what: &str,
    out: &mut BytesMut,
) -> Result<Option<ResultSet>, (&'static str, String)> {
    Ok(Some(match what {
        "POOLS" => show::pools(shared),
        "STATS" => stats::stats(shared),
        "STATS_TOTALS" => stats::stats_totals(shared, false),
        "STATS_AVERAGES" => stats::stats_totals(shared, true),
        "TOTALS" => stats::totals(shared),
        "CLIENTS" => show::clients(shared),
        "SERVERS" => show::servers(shared),
        "DATABASES" => show::databases(shared),
        "HOSTS" => hosts::hosts(shared),
        "USERS" => show::users(shared),
        "CONFIG" => show::config(shared),
        "LISTS" => show::lists(shared),
        "VERSION" => show::version(),
        "STATE" => show::state(shared),
        "GUARD" => show::guard(shared),
        "HELP" => {
            let list = SHOWS.join("|");
            protocol::notice_response(out, "00000", &format!("Console usage: SHOW {list}"));
            protocol::notice_response(
                out,
                "00000",
                "PAUSE, RESUME, RELOAD, SET key = value, SHUTDOWN",
            );
            protocol::command_complete(out, "SHOW");
            return Ok(None);
        }
        "" => return Err(("42601", "pgsluice: SHOW what? (try SHOW HELP)".to_string())),
        w => {
            return Err((
                "42601",
                format!("pgsluice: unknown SHOW {w:?} (try SHOW HELP)"),
            ))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(
            statements("show pools; show stats;"),
            vec!["show pools", "show stats"]
        );
        assert_eq!(statements("set a = 'x;y'"), vec!["set a = 'x;y'"]);
        assert!(statements(" ; ").is_empty());
    }

    #[test]
    fn set_parses_both_spellings_and_pgbouncer_names() {
        let p = |s: &str| parse_set(s).map_err(|e| e.0);
        assert_eq!(
            p("SET max_active = 8"),
            Ok(("max_active".into(), "8".into()))
        );
        assert_eq!(
            p("set Query_Timeout TO '2s'"),
            Ok(("query_timeout".into(), "2s".into()))
        );
        assert_eq!(
            p("SET default_pool_size=30"),
            Ok(("pool_size".into(), "30".into()))
        );
        assert_eq!(
            p("SET query_wait_timeout = 120"),
            Ok(("queue_timeout".into(), "120s".into()))
        );
        assert_eq!(
            p("SET queue_timeout = 0"),
            Ok(("queue_timeout".into(), "0".into()))
        );
        assert_eq!(
            p("SET admin_users = 'a,b''c'"),
            Ok(("admin_users".into(), "a,b'c".into()))
        );
        for bad in ["SET", "SET max_active", "SET = 3", "SET a b = 3", "SET x ="] {
            assert_eq!(p(bad), Err("42601"), "{bad}");
        }
    }
}
