//! Where session parameters meet a session: startup values checked at connect, the server
//! brought to the client's state before a batch, values read back after a transaction.

use super::{sql, startup_set, Mode, ParamSet, Tracker, APPLICATION_NAME, TRACKED};
use crate::pool::ServerConn;
use crate::protocol::{self, ErrorFields, FrameScanner};
use crate::session::startup::Refusal;
use crate::session::Session;
use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::{debug, warn};

/// Startup values already checked, with the server's spelling of them. Drivers send the
/// same few values on every connect; only the first of each costs a round trip. Validity
/// of these parameters does not depend on database or user.
fn checked() -> &'static Mutex<HashMap<(usize, String), String>> {
    static CHECKED: OnceLock<Mutex<HashMap<(usize, String), String>>> = OnceLock::new();
    CHECKED.get_or_init(Default::default)
}
const CHECKED_CAP: usize = 4096;

/// The last value given for each tracked startup parameter.
fn last_per_name(wanted: &[(usize, String)]) -> Vec<(usize, &str)> {
    let mut last: [Option<&str>; TRACKED.len()] = Default::default();
    for (i, v) in wanted {
        last[*i] = Some(v);
    }
    last.iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .collect()
}

/// True when some startup value has not been checked yet (a server is needed for it).
pub fn needs_check(wanted: &[(usize, String)]) -> bool {
    let c = checked().lock();
    last_per_name(wanted)
        .iter()
        .any(|(i, v)| *i != APPLICATION_NAME && !c.contains_key(&(*i, v.to_string())))
}

/// The client's startup values in the server's spelling, checking unchecked ones on
/// `server` without changing its session. A value PostgreSQL would refuse gets the same
/// FATAL error it would send.
pub async fn resolve(
    server: Option<&mut ServerConn>,
    wanted: &[(usize, String)],
) -> Result<Vec<(usize, String)>, Refusal> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    {
        let c = checked().lock();
        for (i, v) in last_per_name(wanted) {
            match c.get(&(i, v.to_string())) {
                Some(canon) => out.push((i, canon.clone())),
                None if i == APPLICATION_NAME => out.push((i, v.to_string())),
                None => missing.push((i, v)),
            }
        }
    }
    let Some(server) = server.filter(|_| !missing.is_empty()) else {
        out.extend(missing.iter().map(|(i, v)| (*i, v.to_string())));
        return Ok(out);
    };
    let rows = simple_rows(&mut server.stream, &sql::validate_sql(&missing))
        .await
        .map_err(|e| Refusal("08006", format!("pgsluice: upstream unavailable: {e}")))?;
    let row = match rows {
        Ok(mut rows) if rows.len() == 1 => rows.remove(0),
        Ok(_) => {
            return Err(Refusal(
                "08006",
                "pgsluice: unexpected answer to a parameter check".into(),
            ))
        }
        Err(f) => return Err(Refusal(static_code(&f.code), f.message)),
    };
    let mut c = checked().lock();
    if c.len() >= CHECKED_CAP {
        c.clear();
    }
    for ((i, v), canon) in missing.iter().zip(row) {
        let canon = canon.unwrap_or_else(|| v.to_string());
        c.insert((*i, v.to_string()), canon.clone());
        out.push((*i, canon));
    }
    Ok(out)
}

fn static_code(code: &str) -> &'static str {
    match code {
        "22P02" => "22P02",
        "42704" => "42704",
        "42501" => "42501",
        "55P02" => "55P02",
        "0A000" => "0A000",
        _ => "22023",
    }
}

/// The tracked parameters an idle server has SET (`None`: at its reset value). A SET to
/// the value the server would reset to still counts as set: only the source tells it from
/// a RESET, and after a RESET the client's startup value applies instead.
pub async fn read_back<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> io::Result<ParamSet> {
    let rows = simple_rows(stream, &sql::read_back_sql())
        .await?
        .map_err(|f| io::Error::other(format!("{}: {}", f.code, f.message)))?;
    let mut set = ParamSet::default();
    for row in rows {
        let [Some(name), setting, source] = &row[..] else {
            continue;
        };
        if let Some(i) = super::index(name) {
            set.set(
                i,
                (source.as_deref() == Some("session")).then_some(setting.as_deref().unwrap_or("")),
            );
        }
    }
    Ok(set)
}

type Rows = Vec<Vec<Option<String>>>;

/// Runs one simple query on an idle server: its rows as text, or the server's error.
async fn simple_rows<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    sql: &str,
) -> io::Result<Result<Rows, ErrorFields>> {
    let mut b = BytesMut::with_capacity(sql.len() + 8);
    protocol::query(&mut b, sql);
    stream.write_all(&b).await?;
    // A TLS stream may hold written bytes until flushed.
    stream.flush().await?;
    // The server sends nothing after ReadyForQuery, so the reader holds no extra bytes.
    let mut r = BufReader::with_capacity(8192, stream);
    let mut rows = Vec::new();
    let mut error = None;
    for _ in 0..10_000 {
        let (tag, body) = protocol::read_message(&mut r, 1 << 20)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match tag {
            b'D' => rows.push(data_row(&body)?),
            b'E' => error = Some(protocol::parse_error_fields(&body)),
            b'Z' => return Ok(error.map_or(Ok(rows), Err)),
            _ => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no ReadyForQuery",
    ))
}

fn data_row(body: &[u8]) -> io::Result<Vec<Option<String>>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed DataRow");
    let n = i16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .unwrap_or_default(),
    );
    let mut at = 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .unwrap_or_default(),
        );
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize).ok_or_else(bad)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at += len as usize;
    }
    Ok(out)
}

/// The startup parameters a session-mode login sends beyond the pool's usual ones: all of
/// the client's, except the `client_encoding` every login sends anyway.
fn login_key(canonical: &[(usize, String)]) -> ParamSet {
    let mut key = ParamSet::default();
    for (i, v) in canonical {
        let usual = TRACKED[*i] == "client_encoding" && v == "UTF8";
        key.set(*i, (!usual).then_some(v.as_str()));
    }
    key
}

impl Session {
    /// Starts tracking with the client's checked startup values; `server` is the
    /// upstream's ParameterStatus set.
    pub(in crate::session) fn start_params(
        &mut self,
        canonical: &[(usize, String)],
        server: &[(String, String)],
    ) {
        let mode = match self.pool.mode {
            crate::config::PoolMode::Session => Mode::Session,
            crate::config::PoolMode::Transaction => Mode::Transaction,
        };
        self.st.params = Tracker::new(mode, startup_set(canonical, server));
        if mode == Mode::Transaction {
            self.st.params.set_defaults(server);
        }
        if mode == Mode::Transaction {
            // Query and Parse texts are looked at for SET, RESET and DISCARD; Bind and
            // Close for statements prepared from such texts.
            self.st.cscan = FrameScanner::new(b"QPBC");
        }
    }

    /// Session pooling: the client's server must have logged in with the client's startup
    /// parameters, so that they are the backend's reset values as for a direct client
    /// (`RESET`, `RESET ALL`, `DISCARD ALL`, `reset_val` return to them). A pooled
    /// connection that logged in with other ones is replaced, in its pool slot, by a fresh
    /// login; clients with the same startup parameters reuse each other's connections.
    pub(in crate::session) async fn session_login(
        &mut self,
        canonical: &[(usize, String)],
    ) -> Result<(), Refusal> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let key = Some(login_key(canonical))
            .filter(|k| *k != ParamSet::default())
            .map(Box::new);
        if server.login != key {
            let pairs: Vec<(&str, &str)> = key
                .iter()
                .flat_map(|k| (0..TRACKED.len()).filter_map(|i| k.get(i).map(|v| (TRACKED[i], v))))
                .collect();
            let fresh = self
                .pool
                .connect_with(&pairs)
                .await
                .map_err(crate::session::pool_refusal)?;
            let mut old = std::mem::replace(&mut **server, fresh);
            server.login = key;
            debug!(identity = %self.identity, old = old.pid, new = server.pid, "server connection logged in with the client's startup parameters");
            let mut b = BytesMut::with_capacity(5);
            protocol::terminate(&mut b);
            let bye = async {
                old.stream.write_all(&b).await?;
                old.stream.flush().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        }
        // The backend is in the client's state already: nothing to replay.
        server.params = self.st.params.current.clone();
        Ok(())
    }

    /// Before a batch runs outside a transaction: if the server's recorded state differs
    /// from the client's, pipeline one query ahead of the batch that changes exactly the
    /// differing parameters; its answers are removed from the stream.
    pub(in crate::session) fn sync_params(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        // Logged in with a session-mode client's parameters (before a reload switched to
        // transaction mode): its reset values are not the pool's, so it is not kept.
        if server.login.is_some() && self.st.params.mode == Mode::Transaction {
            server.broken = true;
        }
        if self.st.status != b'I' || self.st.params.current == server.params {
            return;
        }
        let sql = sql::sync_sql(&self.st.params.current, &server.params);
        let mut b = BytesMut::with_capacity(sql.len() + 8);
        protocol::query(&mut b, &sql);
        if self.st.inject_front(&b) {
            debug!(identity = %self.identity, %sql, "replaying session parameters");
            self.st.params.injected();
            server.params = self.st.params.current.clone();
        }
    }

    /// Ends the session with a FATAL (after the batch's answer): its settings are unknown.
    async fn lost_settings(&mut self) {
        crate::session::startup::send_fatal(
            &mut self.client,
            "08006",
            crate::session::flow::LOST_SETTINGS,
        )
        .await;
        // `after_idle` drops the server and ends the session.
        self.st.server_fatal = true;
        self.st.fatal_to_client = true;
    }

    /// After a batch: once the transaction is over, record the server's new state, reading
    /// it back when a statement may have changed a parameter.
    /// What follows a batch for the session's parameters, without a future in the common
    /// case. True when the rare async part (`params_after_batch`) must follow: a read-back,
    /// or the end of a client whose settings died with its server.
    pub(in crate::session) fn params_after_batch_quick(&mut self) -> bool {
        if self.st.server_fatal {
            // The server went away right after the batch (its FATAL was not the client's
            // to see): what the batch set cannot be read back, so the client's session
            // cannot go on as it knows it.
            return self.st.params.needs_read_back() && !self.st.fatal_to_client;
        }
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        if self.st.params.take_sync_failed() {
            warn!(identity = %self.identity, "replaying session parameters failed; closing that server connection");
            server.broken = true;
        }
        if self.st.status != b'I' {
            return false;
        }
        if !self.st.params.needs_read_back() {
            if let Some(p) = self.st.params.settle() {
                server.params = p;
            }
            return false;
        }
        true
    }

    /// The async remainder of `params_after_batch_quick`, when it said so.
    pub(in crate::session) async fn params_after_batch(&mut self) {
        if self.st.server_fatal {
            self.lost_settings().await;
            return;
        }
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let grace = self.cfg.cancel_grace.max(Duration::from_secs(1));
        match tokio::time::timeout(grace, read_back(&mut server.stream)).await {
            Ok(Ok(actual)) => server.params = self.st.params.apply_read_back(actual),
            other => {
                warn!(identity = %self.identity, ?other, "could not read session parameters back; closing that server connection and the client's");
                server.broken = true;
                self.lost_settings().await;
                return;
            }
        }
        // After a RESET the server reported its own default, but the client's value is its
        // startup value again (applied before its next batch). The client has everything
        // up to ReadyForQuery, and ParameterStatus may come at any time.
        let reported = self.pool.server_params();
        let mut b = BytesMut::new();
        for (i, v) in self.st.params.take_announce() {
            if reported
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(TRACKED[i]))
            {
                protocol::parameter_status(&mut b, TRACKED[i], v);
            }
        }
        if !b.is_empty() {
            // A client gone meanwhile is noticed at its next read.
            let _ = crate::session::startup::send(&mut self.client, &b).await;
        }
    }
}
