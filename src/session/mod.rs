//! One client's life: startup, then the relay loop that admits each query through the
//! guard, borrows a server connection for it, and returns the connection when the
//! transaction ends (transaction mode) or when the client leaves (session mode).

pub mod bufpool;
mod copyin;
mod flow;
mod idle;
pub mod params;
pub mod prepared;
pub mod relay;
/// The client handshake lives in `crate::handshake` (the console and the accept loop use it
/// too); sessions call it by its old name.
pub use crate::handshake as startup;
mod stmt_sql;

use crate::cancel::{BackendTarget, CancelEntry};
use crate::config::{Config, PoolMode};
use crate::guard::{AdmitRequest, Lease, Permit, Shed};
use crate::pool::{PoolEntry, PoolError};
use crate::protocol::{self, Severity};
use crate::state::Shared;
use crate::tls::ClientStream;
use bytes::BytesMut;
use relay::{RelayEvent, RelayState};
use startup::{Refusal, StartupInfo};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

type Server = crate::pool::Leased;

/// Runs a client connection to the end. Never panics on client input.
pub async fn run(sock: TcpStream, shared: Arc<Shared>) {
    let cfg = shared.config();
    let tls = shared.client_tls();
    let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
    let Some((mut client, info)) = startup::open(
        sock,
        tls.as_deref(),
        &shared.cancels,
        deadline,
        params::from_startup,
    )
    .await
    else {
        return;
    };
    drop(tls);
    // Boxed: a lookup and an authentication exchange would otherwise enlarge every session's
    // future for its whole life.
    let Some(learnt) = Box::pin(login(&mut client, &shared, &cfg, &info)).await else {
        return;
    };
    if crate::console::is_console(&info.database) {
        // Boxed: the console's state would otherwise enlarge every session's future.
        let ci = client_info(&client, &info);
        return Box::pin(crate::console::run(client, shared, ci)).await;
    }
    let pool = shared.pools.get_or_create(&info.database, &info.user);
    pool.learn_credentials(learnt);
    pool.stats.login();
    let identity: Arc<str> = info
        .application_name
        .clone()
        .unwrap_or_else(|| info.user.clone())
        .into();
    let entry = shared.cancels.register(
        pool.label.clone(),
        identity.clone(),
        client_info(&client, &info),
    );
    let client_id = shared.next_client_id();
    let mut st = RelayState::new();
    if pool.mode == PoolMode::Transaction {
        st.enable_rewrite(client_id, cfg.max_prepared_statements);
    }
    let mut s = Session {
        client,
        shared: shared.clone(),
        cfg,
        pool,
        identity,
        client_id,
        entry,
        server: None,
        st,
        last_admitted: None,
        tx_started: Instant::now(),
        info,
    };
    if let Err(Refusal(code, msg)) = s.greet().await {
        startup::send_fatal(&mut s.client, code, &msg).await;
    } else {
        s.serve().await;
    }
    s.finish().await;
}

/// Authenticates the client (looking it up upstream when `--auth-user` is set and the users
/// file does not know it). Returns what the login proved for logging in upstream as the
/// client, or None once the client was refused.
async fn login(
    client: &mut ClientStream,
    shared: &Shared,
    cfg: &Config,
    info: &StartupInfo,
) -> Option<crate::auth::Credentials> {
    let users = shared.users();
    let looked_up = match (users.get(&info.user), &shared.pools.auth_query) {
        (None, Some(aq)) if cfg.auth != crate::auth::AuthMethod::Trust => {
            let db = shared.pools.upstream_dbname(&info.database);
            match aq.lookup(&info.user, &db).await {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "auth query failed");
                    let msg = "pgsluice: cannot look up users on the upstream right now";
                    startup::send_fatal(client, "08006", msg).await;
                    return None;
                }
            }
        }
        _ => None,
    };
    let entry = users.get(&info.user).or(looked_up.as_ref());
    let auth = tokio::time::timeout(
        cfg.startup_timeout,
        startup::authenticate(client, cfg.auth, &info.user, entry),
    )
    .await;
    match auth {
        Ok(Ok(a)) => Some({
            // Here, in the boxed login, rather than in the session's own future. With no
            // span per client, this line ties the peer to what later lines name.
            debug!(peer = ?client.tcp().peer_addr().ok(), database = %info.database, user = %info.user, application_name = ?info.application_name, "client logged in");
            match (a.scram_keys, entry.map(|e| &e.secret)) {
                (Some(k), _) => crate::auth::Credentials::Scram(k),
                (None, Some(crate::auth::Secret::Md5(h))) => {
                    crate::auth::Credentials::Md5(h.clone())
                }
                _ => crate::auth::Credentials::None,
            }
        }),
        Ok(Err(Refusal(code, msg))) => {
            info!(user = %info.user, code, "authentication failed");
            startup::send_fatal(client, code, &msg).await;
            None
        }
        Err(_) => {
            startup::send_fatal(client, "08P01", "pgsluice: authentication timed out").await;
            None
        }
    }
}

/// Who the client is, for the console's `SHOW CLIENTS`.
fn client_info(client: &ClientStream, info: &StartupInfo) -> crate::cancel::ClientInfo {
    crate::cancel::ClientInfo {
        user: info.user.clone(),
        database: info.database.clone(),
        application_name: info.application_name.clone().unwrap_or_default(),
        peer: client.tcp().peer_addr().ok(),
        local: client.tcp().local_addr().ok(),
        connected: std::time::SystemTime::now(),
        tls: client.is_tls(),
    }
}

struct Session {
    client: ClientStream,
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    pool: Arc<PoolEntry>,
    identity: Arc<str>,
    client_id: u64,
    entry: Arc<CancelEntry>,
    server: Option<Server>,
    st: RelayState,
    last_admitted: Option<Instant>,
    /// When the current (or last) transaction's first batch started.
    tx_started: Instant,
    info: StartupInfo,
}

/// How a query's admission ended.
enum Admission {
    Admitted(Permit),
    Refused,
    ClientGone,
}

impl Session {
    /// Sends AuthenticationOk, the server's parameters, our BackendKeyData and ReadyForQuery.
    async fn greet(&mut self) -> Result<(), Refusal> {
        let mut params = self.pool.server_params();
        let check = params::needs_check(&self.info.params);
        let mut canonical = None;
        if params.is_empty() || self.pool.mode == PoolMode::Session || check {
            // First client of this pool (or session mode, or startup values to check): log
            // in upstream now, so a bad database, user or setting is reported at connect
            // time as PostgreSQL would.
            // Boxed: a login that needs a server is rare next to the queries that follow.
            let lease = Box::pin(self.login_lease()).await?;
            let mut server = self
                .pool
                .get(self.cfg.connect_timeout, lease, self.entry.pid)
                .await
                .map_err(pool_refusal)?;
            canonical =
                Some(Box::pin(params::resolve(Some(&mut server), &self.info.params)).await?);
            params = self.pool.server_params();
            if self.pool.mode == PoolMode::Session {
                self.server = Some(server);
            }
        }
        let canonical = match canonical {
            Some(c) => c,
            None => Box::pin(params::resolve(None, &self.info.params)).await?,
        };
        self.start_params(&canonical, &params);
        if self.pool.mode == PoolMode::Session {
            Box::pin(self.session_login(&canonical)).await?;
        }
        let mut b = BytesMut::with_capacity(512);
        protocol::auth_ok(&mut b);
        for (k, v) in &params {
            let v = match k.as_str() {
                // Without one of the client's, the server's default (as direct).
                "application_name" => self.info.application_name.as_deref().unwrap_or(v),
                _ => self.st.params.startup_value(k).unwrap_or(v.as_str()),
            };
            protocol::parameter_status(&mut b, k, v);
        }
        protocol::backend_key_data(
            &mut b,
            self.entry.pid,
            crate::cancel::CancelRegistry::secret_of(&self.entry),
        );
        protocol::ready_for_query(&mut b, b'I');
        startup::send(&mut self.client, &b)
            .await
            .map_err(|e| Refusal("08006", e.to_string()))?;
        Ok(())
    }

    fn refresh_config(&mut self) {
        if self.shared.config_generation() != self.cfg_generation() {
            self.cfg = self.shared.config();
        }
    }

    fn cfg_generation(&self) -> u64 {
        self.cfg.generation
    }

    /// The relay loop; returns when the client is gone or the proxy shuts down.
    async fn serve(&mut self) {
        loop {
            if self.st.discard_done {
                // A refused batch has fully arrived: close it with ReadyForQuery.
                self.st.discard_done = false;
                if self.ready(None).await.is_err() {
                    return;
                }
            }
            // Wait for the client's next message with nothing in flight.
            if !self.st.has_client_work() {
                if self.st.terminated || self.st.client_eof {
                    return;
                }
                self.st.release_buffers();
                if !self.wait_client().await {
                    return;
                }
                continue;
            }
            self.refresh_config();
            let mut permit = match self.admit().await {
                Admission::Admitted(p) => p,
                Admission::Refused => continue,
                Admission::ClientGone => return,
            };
            self.last_admitted = Some(Instant::now());
            if self.server.is_none() {
                // Admission granted a connection lease with the slot (one decision): the pool
                // has a connection for it or room to open one, so this waits only for a connect.
                let Some(lease) = permit.take_lease() else {
                    debug_assert!(false, "admitted without a server and without a lease");
                    return;
                };
                match self
                    .pool
                    .get(self.cfg.connect_timeout, lease, self.entry.pid)
                    .await
                {
                    Ok(s) => {
                        let connecting = self.last_admitted.map(|t| t.elapsed());
                        self.pool
                            .stats
                            .assigned(permit.waited() + connecting.unwrap_or_default());
                        self.server = Some(s);
                    }
                    Err(e) => {
                        let (code, msg) = match &e {
                            PoolError::Exhausted => (
                                "53400",
                                "pgsluice: database busy: no server connection free in time"
                                    .to_string(),
                            ),
                            _ => match e.server_error() {
                                Some((_, m)) => (
                                    "08006",
                                    format!("pgsluice: upstream refused the login: {m}"),
                                ),
                                None => ("08006", format!("pgsluice: upstream unavailable: {e}")),
                            },
                        };
                        warn!(identity = %self.identity, error = %e, "no server connection");
                        drop(permit);
                        self.shared.count_query(
                            &self.pool,
                            if code == "53400" {
                                "shed"
                            } else {
                                "upstream_lost"
                            },
                        );
                        if self.refuse_batch(code, &msg, None).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            self.sync_params();
            if !self.run_query(permit).await {
                return;
            }
        }
    }

    /// Waits for one of the pool's server connections at login (no slot: nothing runs yet).
    async fn login_lease(&mut self) -> Result<Lease, Refusal> {
        let mut req = self.admit_request();
        req.slot = false;
        req.lease = true;
        // A login runs no statement: statement_timeout does not bound it.
        req.deadline = None;
        match self.shared.guard.admit(req).await {
            Ok(mut p) => p
                .take_lease()
                .ok_or_else(|| Refusal("08006", "pgsluice: no server connection lease".into())),
            Err(shed) => Err(Refusal(
                shed.reason.sqlstate(),
                format!("{} ({})", shed.message(), shed.hint()),
            )),
        }
    }

    /// Waits for client bytes while idle. False when the client is gone.
    async fn wait_client(&mut self) -> bool {
        let idle_tx = self
            .cfg
            .idle_in_transaction_timeout
            .filter(|_| self.st.status != b'I' && self.server.is_some());
        let mut shutdown = self.shared.shutdown_rx();
        let in_tx = self.st.status != b'I';
        // Boxed, and only when set: the timer would otherwise enlarge every session's future.
        // Made once, so wake-ups that bring no message do not restart it.
        let mut idle_sleep = idle_tx.map(|d| Box::pin(tokio::time::sleep(d)));
        loop {
            let readable = self.client.readable();
            let watch_server = self.server.is_some();
            let res = tokio::select! {
                r = readable => r,
                _ = server_readable(&mut self.server), if watch_server => {
                    // Boxed: rare, and it would otherwise enlarge every session's future.
                    if !Box::pin(self.server_spoke()).await {
                        return false;
                    }
                    continue;
                }
                _ = sleep_opt(idle_sleep.as_mut()) => {
                    self.idle_in_transaction_expired().await;
                    return false;
                }
                _ = self.entry.killed() => {
                    Box::pin(self.end_killed(None)).await;
                    return false;
                }
                _ = async { let _ = shutdown.wait_for(|v| *v).await; }, if !in_tx => {
                    startup::send_fatal(&mut self.client, "57P01", "pgsluice: terminating connection because the proxy is shutting down").await;
                    return false;
                }
            };
            if res.is_err() {
                self.st.client_eof = true;
                return false;
            }
            match self.read_client_nonblocking() {
                Ok(true) => return !self.st.client_eof,
                Ok(false) => continue,
                Err(msg) => {
                    startup::send_fatal(&mut self.client, "08P01", &msg).await;
                    return false;
                }
            }
        }
    }

    /// `KILL db` reached this session. Its server connection is closed, never pooled (it
    /// may hold the client's transaction or session state), after a cancel of the query
    /// `running` on it; the client hears what PostgreSQL says when a backend is terminated.
    async fn end_killed(&mut self, running: Option<BackendTarget>) {
        info!(identity = %self.identity, "session killed from the admin console");
        if let Some(t) = running {
            if let Err(e) = crate::cancel::send_cancel(t, self.cfg.cancel_grace).await {
                debug!(error = %e, "could not cancel the killed session's query");
            }
        }
        if let Some(mut s) = self.server.take() {
            s.broken = true;
        }
        self.st.terminated = true;
        startup::send_fatal(
            &mut self.client,
            "57P01",
            "terminating connection due to administrator command (pgsluice: KILL)",
        )
        .await;
    }

    /// Reads what the client has sent without blocking. Ok(false) when nothing was there.
    fn read_client_nonblocking(&mut self) -> Result<bool, String> {
        if !self.st.c2s.has_spare() {
            return Ok(true);
        }
        // Taking spare room may rewind an empty buffer to offset 0: read `end` after it.
        let _ = self.st.c2s.spare();
        let from = self.st.c2s.end;
        match self.client.try_read(self.st.c2s.spare()) {
            Ok(0) => {
                self.st.client_eof = true;
                Ok(true)
            }
            Ok(n) => {
                self.st.c2s.end += n;
                if let Err(e) = self.st.scan_client(from) {
                    debug!(error = %e, "client protocol violation");
                    return Err(format!("pgsluice: invalid message from client: {e}"));
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => {
                self.st.client_eof = true;
                Ok(true)
            }
        }
    }
}

/// Resolves when the attached server's socket is readable (never without a server).
async fn server_readable(server: &mut Option<Server>) {
    match server {
        Some(s) => {
            let _ = s.stream.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_opt(s: Option<&mut std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match s {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

pub(in crate::session) fn pool_refusal(e: PoolError) -> Refusal {
    match e.server_error() {
        Some((code, msg)) => Refusal(static_code(code), msg.to_string()),
        None => Refusal("08006", format!("pgsluice: upstream unavailable: {e}")),
    }
}

/// Maps an upstream SQLSTATE to a static string for the FATAL we send.
fn static_code(code: &str) -> &'static str {
    match code {
        "28P01" => "28P01",
        "28000" => "28000",
        "3D000" => "3D000",
        "53300" => "53300",
        "57P03" => "57P03",
        _ => "08006",
    }
}
