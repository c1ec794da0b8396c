//! Server connections: one bb8 pool per (database, user), connections that log in to the
//! upstream, are discarded when broken or too old, and never reach another client dirty.

use crate::auth::upstream::{upstream_login, Binding, Credentials, UpstreamAuthError};
use crate::config::{PoolMode, Upstream};
use crate::guard::{Guard, Lease};
use crate::metrics as m;
use crate::tls::upstream::UpstreamTls;
use crate::upstream::{NoHost, Route, Topology};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub mod auth_query;
pub mod conn;
pub mod conn_state;
mod registry;
pub mod stats;
pub use conn::ServerConn;
pub use registry::PoolRegistry;
use stats::{PoolStats, ServerInfo, ServerList};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("could not connect to upstream {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("upstream login failed: {0}")]
    Login(#[from] UpstreamAuthError),
    #[error("TLS to upstream {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("timed out connecting to upstream {0}")]
    Timeout(String),
    #[error("no server connection became free in time")]
    Exhausted,
    /// A connect attempt made for this pool while we waited failed.
    #[error("{0}")]
    Failed(String),
    /// An idle pooled connection was found closed or talking at checkout.
    #[error("server connection died while idle")]
    Stale,
    /// A host reached as the primary said it is a standby (a failover in progress).
    #[error("upstream {0} is a standby, not the primary")]
    NotPrimary(String),
    #[error("{0}")]
    NoHost(#[from] NoHost),
}

impl PoolError {
    /// Errors the upstream itself reported (bad password, unknown database) are passed to the
    /// client as they are; everything else means the upstream could not be reached.
    pub fn server_error(&self) -> Option<(&str, &str)> {
        match self {
            PoolError::Login(UpstreamAuthError::Server { code, message, .. }) => {
                Some((code, message))
            }
            _ => None,
        }
    }

    /// True when the failure says something about the upstream's health (breaker input).
    pub fn is_upstream_failure(&self) -> bool {
        match self {
            PoolError::Connect { .. }
            | PoolError::Tls { .. }
            | PoolError::Timeout(_)
            | PoolError::Failed(_)
            | PoolError::NotPrimary(_)
            | PoolError::NoHost(_) => true,
            PoolError::Login(UpstreamAuthError::Server { code, .. }) => {
                // Startup/shutdown/too many connections: the server is not serving.
                code.starts_with("57P") || code == "53300"
            }
            PoolError::Login(UpstreamAuthError::Io(_)) => true,
            _ => false,
        }
    }
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Creates and checks server connections for one (database, user).
#[derive(Clone)]
pub struct ServerManager {
    upstream: Upstream,
    topology: Arc<Topology>,
    route: Route,
    /// Why the latest multi-host connect found no host (the error a timed-out one reports).
    no_host: Arc<Mutex<Option<String>>>,
    tls: Arc<UpstreamTls>,
    user: String,
    database: String,
    /// Learnt at a client's login when not configured (SCRAM keys, an MD5 hash).
    creds: Arc<RwLock<Credentials>>,
    connect_timeout: Duration,
    lifetime: Option<Duration>,
    guard: Arc<Guard>,
    label: Arc<str>,
    /// The server's ParameterStatus set, remembered from the first login.
    params: Arc<RwLock<Vec<(String, String)>>>,
    /// Tells waiters of this pool that a connect attempt failed (bb8 does not hand connect
    /// errors to the callers waiting in `get`; without this they would wait out their
    /// timeout while the upstream is down).
    failures: Arc<ConnectFailures>,
    servers: Arc<ServerList>,
}

/// The latest connect failure of a pool, broadcast to everyone waiting for a connection.
#[derive(Default)]
pub struct ConnectFailures {
    notify: tokio::sync::Notify,
    last: Mutex<Option<String>>,
}

impl ServerManager {
    /// Logs in with `login` as extra startup parameters (session pooling: the backend then
    /// takes them as its reset values, as for a direct client). The pool's own connections
    /// send none beyond `client_encoding`, and no `application_name`, so a client that sends
    /// none sees the server's default.
    async fn connect_inner(
        &self,
        idx: usize,
        login: &[(&str, &str)],
    ) -> Result<ServerConn, PoolError> {
        let host = &self.topology.host(idx).addr;
        let addr_s = host.label();
        let tcp = TcpStream::connect(host.connect_addr())
            .await
            .map_err(|source| PoolError::Connect {
                addr: addr_s.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let peer: SocketAddr = tcp.peer_addr().map_err(|source| PoolError::Connect {
            addr: addr_s.clone(),
            source,
        })?;
        let local = tcp.local_addr().ok();
        let secured = self
            .tls
            .secure(tcp, &host.host)
            .await
            .map_err(|reason| PoolError::Tls {
                addr: addr_s.clone(),
                reason,
            })?;
        let mut stream = secured.stream;
        let binding = Binding {
            tls: stream.is_tls(),
            end_point: secured.end_point,
            mode: self.upstream.channel_binding,
        };
        let mut params = vec![
            ("user", self.user.as_str()),
            ("database", self.database.as_str()),
        ];
        if !login
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("client_encoding"))
        {
            params.push(("client_encoding", "UTF8"));
        }
        params.extend_from_slice(login);
        let creds = self.creds.read().clone();
        let st = upstream_login(&mut stream, &params, &creds, &binding).await?;
        if !self.topology.accepts_login(self.route, &st.params) {
            return Err(PoolError::NotPrimary(addr_s));
        }
        tracing::debug!(tls = binding.tls, auth = ?st.auth, backend_pid = st.pid, "server connection logged in");
        // The pool's parameters are those of its own logins, not of a client's.
        if login.is_empty() {
            let mut p = self.params.write();
            if p.is_empty() {
                *p = st.params.clone();
            }
        }
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        let info = ServerInfo {
            pid: st.pid,
            addr: peer,
            local,
            connected: std::time::SystemTime::now(),
            tls: binding.tls,
            link: None,
        };
        let mut conn = ServerConn::new(id, stream, peer, st.pid, st.secret);
        conn.host = Some(Box::new(self.topology.count_open(idx)));
        conn.ticket = Some(self.servers.open(id, info));
        Ok(conn)
    }

    /// One host: one attempt. Several: each candidate in turn; when none is there (a
    /// failover between the old primary going and the new one being promoted) it waits for
    /// the next role change instead of failing, bounded by the caller's connect timeout.
    async fn connect_route(&self, login: &[(&str, &str)]) -> Result<ServerConn, PoolError> {
        if self.topology.is_single() {
            return self.connect_inner(0, login).await;
        }
        let mut changed = self.topology.subscribe();
        loop {
            changed.borrow_and_update();
            let mut last = None;
            match self.topology.candidates(self.route) {
                Ok(list) => {
                    for idx in list {
                        match self.connect_inner(idx, login).await {
                            Ok(c) => {
                                *self.no_host.lock() = None;
                                return Ok(c);
                            }
                            // The server's own refusal (a password, a database) is the
                            // same on every host; one that is shutting down or starting
                            // (57P0x) is a host failure like a refused connect.
                            Err(e) if e.server_error().is_some() && !e.is_upstream_failure() => {
                                return Err(e)
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                }
                Err(no) => last = Some(PoolError::NoHost(no)),
            }
            if let Some(e) = &last {
                tracing::debug!(error = %e, route = self.route.as_str(), "no host took the connection; waiting for a role change");
                *self.no_host.lock() = Some(e.to_string());
            }
            // A role change, or a short pause before trying again (a host that refused
            // may be restarting and the checks may not have seen it go).
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
        }
    }

    fn fits(&self, conn: &ServerConn) -> bool {
        conn.host
            .as_ref()
            .map_or(true, |h| self.topology.still_fits(h.idx, self.route))
    }

    fn last_no_host(&self) -> Option<PoolError> {
        if self.topology.is_single() {
            return None;
        }
        self.no_host.lock().clone().map(PoolError::Failed)
    }

    async fn connect_login(&self, login: &[(&str, &str)]) -> Result<ServerConn, PoolError> {
        let res = match tokio::time::timeout(self.connect_timeout, self.connect_route(login)).await
        {
            Ok(r) => r,
            Err(_) => Err(self
                .last_no_host()
                .unwrap_or_else(|| PoolError::Timeout(self.upstream.label()))),
        };
        let outcome = match &res {
            Ok(_) => {
                self.guard.record_success();
                "ok"
            }
            Err(e) => {
                if e.is_upstream_failure() {
                    self.guard.record_failure();
                }
                // A client's own login fails that client only, not the pool's waiters.
                if login.is_empty() {
                    *self.failures.last.lock() = Some(e.to_string());
                    self.failures.notify.notify_waiters();
                }
                "error"
            }
        };
        metrics::counter!(m::SERVER_CONNECTS_TOTAL, "pool" => self.label.to_string(), "outcome" => outcome).increment(1);
        res
    }
}

impl bb8::ManageConnection for ServerManager {
    type Connection = ServerConn;
    type Error = PoolError;

    async fn connect(&self) -> Result<ServerConn, PoolError> {
        self.connect_login(&[]).await
    }

    async fn is_valid(&self, conn: &mut ServerConn) -> Result<(), PoolError> {
        // A dead idle connection is dropped here and bb8 takes the next one; it is not an
        // upstream failure (the breaker only hears about connects). So is one to a host that
        // no longer fits the route (a demoted primary, a lagging standby).
        if !self.fits(conn) {
            conn.broken = true;
            return Err(PoolError::Stale);
        }
        conn.check_idle()
    }

    /// bb8 asks this of every connection coming back, before another client can take it:
    /// the moment it stops being linked to its client in `SHOW SERVERS`.
    fn has_broken(&self, conn: &mut ServerConn) -> bool {
        if let Some(t) = &conn.ticket {
            t.link(None);
        }
        conn.broken || self.lifetime.is_some_and(|l| conn.created.elapsed() > l) || !self.fits(conn)
    }
}

/// Metric handles of one pool, registered once so the hot path does not build labels.
pub struct PoolMetrics {
    ok: metrics::Counter,
    error: metrics::Counter,
    other: HashMap<&'static str, metrics::Counter>,
    pub duration: metrics::Histogram,
}

const OUTCOMES: &[&str] = &["shed", "timeout", "cancelled", "upstream_lost", "abandoned"];

impl PoolMetrics {
    fn new(label: &str) -> Self {
        let c = |o: &'static str| metrics::counter!(m::QUERIES_TOTAL, "pool" => label.to_string(), "outcome" => o);
        PoolMetrics {
            ok: c("ok"),
            error: c("error"),
            other: OUTCOMES.iter().map(|o| (*o, c(o))).collect(),
            duration: metrics::histogram!(m::QUERY_DURATION_SECONDS, "pool" => label.to_string()),
        }
    }

    pub fn queries(&self, outcome: &'static str) -> &metrics::Counter {
        match outcome {
            "ok" => &self.ok,
            "error" => &self.error,
            o => self.other.get(o).unwrap_or(&self.error),
        }
    }
}

/// A pool for one (database, user) plus what the sessions need to know about it.
pub struct PoolEntry {
    failures: Arc<ConnectFailures>,
    pub metrics: PoolMetrics,
    pub pool: bb8::Pool<ServerManager>,
    pub label: Arc<str>,
    /// The client-facing database name (the pool's key).
    pub database: String,
    /// What the pool's server connections log in to (the same unless aliased).
    pub upstream_database: String,
    pub user: String,
    /// Connections this pool may have (bb8's max_size, fixed when the pool was made): the
    /// guard hands out at most this many leases.
    pub capacity: usize,
    /// Session or transaction pooling, fixed when the pool was made.
    pub mode: PoolMode,
    /// Primary, or standbys for a `NAME@ro` database.
    pub route: Route,
    /// Counters for `SHOW STATS`.
    pub stats: PoolStats,
    /// Open server connections, for `SHOW SERVERS`.
    pub servers: Arc<ServerList>,
    creds: Arc<RwLock<Credentials>>,
    params: Arc<RwLock<Vec<(String, String)>>>,
    /// Opens connections with a client's startup parameters (session pooling).
    manager: ServerManager,
}

impl PoolEntry {
    /// Closes the pool's idle server connections now (`KILL db`); connections held by
    /// sessions close with them. It takes them from bb8 without a guard lease: the
    /// database is paused by then, so no lease is granted meanwhile, and a session given
    /// one just before still finds room, since each connection taken here is dropped at once.
    pub async fn close_idle(&self) -> usize {
        let mut closed = 0;
        // Bounded: a connection taken here is gone for good, so the count only falls.
        while self.pool.state().idle_connections > 0 && closed < self.capacity {
            match tokio::time::timeout(Duration::from_millis(50), self.pool.get()).await {
                Ok(Ok(mut c)) => {
                    c.broken = true;
                    closed += 1;
                }
                _ => break,
            }
        }
        closed
    }
}

/// A checked-out server connection with the guard's lease on it. Fields drop in order: the
/// connection goes back to bb8 before the lease lets the next session in, so a session
/// holding a lease never waits for a connection another session is returning.
pub struct Leased {
    conn: bb8::PooledConnection<'static, ServerManager>,
    _lease: Lease,
}

impl Leased {
    /// Returns the connection to the pool and keeps the lease (to be freed by its permit).
    pub fn into_lease(self) -> Lease {
        let Leased { conn, _lease } = self;
        drop(conn);
        _lease
    }
}

impl std::ops::Deref for Leased {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self.conn
    }
}

impl std::ops::DerefMut for Leased {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self.conn
    }
}

impl PoolEntry {
    /// A new server connection logged in with `login` as extra startup parameters, counted
    /// like the pool's own; the caller puts it in place of one it holds from the pool.
    pub async fn connect_with(&self, login: &[(&str, &str)]) -> Result<ServerConn, PoolError> {
        self.manager.connect_login(login).await
    }

    /// Takes what a client's login proved (SCRAM keys, a looked-up MD5 hash) as the way to
    /// log in upstream, unless a password is configured. The latest login wins, so a
    /// changed password takes effect with the next client that uses it.
    pub fn learn_credentials(&self, c: Credentials) {
        let mut cur = self.creds.write();
        if !matches!(*cur, Credentials::Password(_)) && c != Credentials::None {
            *cur = c;
        }
    }

    /// The upstream's ParameterStatus set (empty until the first successful login).
    pub fn server_params(&self) -> Vec<(String, String)> {
        self.params.read().clone()
    }

    /// Checks a connection out under `lease`. The guard grants no more leases than the pool
    /// has connections, so this waits only for a connect (bounded by `wait`), never for
    /// another session.
    /// `client` is the proxy-issued pid of the client taking it (for `SHOW SERVERS`).
    pub async fn get(
        &self,
        wait: Duration,
        lease: Lease,
        client: i32,
    ) -> Result<Leased, PoolError> {
        let conn = self.get_unleased(wait).await?;
        if let Some(t) = &conn.ticket {
            t.link(Some(client));
        }
        Ok(Leased {
            conn,
            _lease: lease,
        })
    }

    async fn get_unleased(
        &self,
        wait: Duration,
    ) -> Result<bb8::PooledConnection<'static, ServerManager>, PoolError> {
        let failed = self.failures.notify.notified();
        tokio::pin!(failed);
        failed.as_mut().enable();
        let got = tokio::select! {
            r = tokio::time::timeout(wait, self.pool.get_owned()) => r,
            _ = &mut failed => {
                let why = self.failures.last.lock().clone().unwrap_or_default();
                return Err(PoolError::Failed(why));
            }
        };
        match got {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(bb8::RunError::User(e))) => Err(e),
            // Several hosts and none to connect to: that, not a busy pool, is why.
            Ok(Err(bb8::RunError::TimedOut)) | Err(_) => {
                Err(self.manager.last_no_host().unwrap_or(PoolError::Exhausted))
            }
        }
    }
}

/// Opens one connection outside any pool (the health check of a single-host upstream).
pub async fn probe(
    upstream: &Upstream,
    tls: &UpstreamTls,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let fut = async {
        let mut s = crate::upstream::monitor::login_url_user(
            upstream,
            upstream.first(),
            tls,
            "pgsluice-health",
        )
        .await?;
        let mut b = bytes::BytesMut::new();
        crate::protocol::terminate(&mut b);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &b).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(())) => Ok(t0.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timed out".into()),
    }
}
