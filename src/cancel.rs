//! Proxy-issued BackendKeyData and the forwarding of CancelRequests to the backend that is
//! running the client's query, never to one that has moved on to someone else's.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The backend a client's current query runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
struct EntryState {
    /// Set while a query of this client runs upstream.
    running: Option<BackendTarget>,
    /// When the running query started (for the cancel log line).
    started: Option<std::time::Instant>,
    /// Cancels being delivered right now; the session waits for them before it lets the
    /// server connection go to another client.
    in_flight: usize,
}

/// Who a client is, for the admin console's `SHOW CLIENTS`.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connected: std::time::SystemTime,
    pub tls: bool,
}

/// One client's registration.
pub struct CancelEntry {
    /// Boxed: read only by the console, and every session holds its entry.
    pub client: Box<ClientInfo>,
    /// Microseconds since [`epoch`] when the client's query was queued; 0 when not queued.
    pub queued_since: AtomicU64,
    pub pid: i32,
    /// Pool label of the client, for metrics.
    pub pool: Arc<str>,
    /// Client identity (application_name, else user), for logs.
    pub identity: Arc<str>,
    secret: i32,
    state: Mutex<EntryState>,
    /// Wakes a session whose query is still queued: it answers 57014 itself. Never holds a
    /// permit: a cancel that finds nobody waiting must not cancel the client's next query.
    queued_cancel: Notify,
    /// True while this client's query waits for admission.
    pub queued: std::sync::atomic::AtomicBool,
    /// Wakes a session waiting for in-flight cancels to finish.
    delivered: Notify,
    /// Set by the admin console's `KILL db`: the session ends as soon as it looks.
    killed: std::sync::atomic::AtomicBool,
    kill: Notify,
}

impl CancelEntry {
    /// Marks a query as running on `target`.
    pub fn start_query(&self, target: BackendTarget) {
        let mut s = self.state.lock();
        s.running = Some(target);
        s.started = Some(std::time::Instant::now());
    }

    pub fn end_query(&self) {
        self.state.lock().running = None;
    }

    /// Waits (bounded) until no cancel for this client is on its way to a backend, so a
    /// released server connection cannot be hit by a cancel meant for this client.
    pub async fn wait_no_cancel_in_flight(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.delivered.notified();
            if self.state.lock().in_flight == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub fn cancel_in_flight(&self) -> bool {
        self.state.lock().in_flight > 0
    }

    /// The backend its query runs on and when that query started (also after it ended).
    pub fn activity(&self) -> (Option<BackendTarget>, Option<std::time::Instant>) {
        let s = self.state.lock();
        (s.running, s.started)
    }

    /// Resolves when a cancel for the client's queued query arrives. Enable it (poll it or
    /// `enable()`) before [`set_queued`](Self::set_queued)`(true)`, so no cancel is missed.
    pub fn queued_cancelled(&self) -> tokio::sync::futures::Notified<'_> {
        self.queued_cancel.notified()
    }

    /// Ends the session (`KILL db`): it drops its server connection and tells the client.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kill.notify_waiters();
    }

    /// Resolves once [`kill`](Self::kill) was called, before or after this future.
    pub async fn killed(&self) {
        loop {
            let n = self.kill.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.killed.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// Marks the client as queued from now (`true`) or no longer queued.
    pub fn set_queued(&self, queued: bool) {
        let at = if queued {
            (epoch().elapsed().as_micros() as u64).max(1)
        } else {
            0
        };
        self.queued_since.store(at, Ordering::Relaxed);
        self.queued.store(queued, Ordering::Release);
    }

    /// How long the client's query has been queued, if it is.
    pub fn queued_for(&self) -> Option<Duration> {
        match self.queued_since.load(Ordering::Relaxed) {
            0 => None,
            at => Some(epoch().elapsed().saturating_sub(Duration::from_micros(at))),
        }
    }
}

/// A fixed instant that queue times are counted from.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// All connected clients, by proxy-issued pid.
#[derive(Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, Arc<CancelEntry>>>,
    next_pid: AtomicU64,
}

/// What happened to a CancelRequest.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Forwarded,
    Queued,
    Idle,
    Unknown,
}

impl CancelRegistry {
    pub fn new() -> Self {
        CancelRegistry {
            entries: Mutex::new(HashMap::new()),
            next_pid: AtomicU64::new(rand::random::<u16>() as u64 + 1000),
        }
    }

    pub fn register(
        self: &Arc<Self>,
        pool: Arc<str>,
        identity: Arc<str>,
        client: ClientInfo,
    ) -> Arc<CancelEntry> {
        let client = Box::new(client);
        let mut entries = self.entries.lock();
        loop {
            // Positive, non-zero and unused: some clients treat pid 0 as "no key".
            let pid =
                (self.next_pid.fetch_add(1, Ordering::Relaxed) % (i32::MAX as u64 - 1) + 1) as i32;
            if entries.contains_key(&pid) {
                continue;
            }
            let e = Arc::new(CancelEntry {
                client: client.clone(),
                queued_since: AtomicU64::new(0),
                pid,
                pool: pool.clone(),
                identity: identity.clone(),
                secret: rand::random(),
                state: Mutex::new(EntryState::default()),
                queued_cancel: Notify::new(),
                queued: std::sync::atomic::AtomicBool::new(false),
                delivered: Notify::new(),
                killed: std::sync::atomic::AtomicBool::new(false),
                kill: Notify::new(),
            });
            entries.insert(pid, e.clone());
            return e;
        }
    }

    /// Every registered client, in pid order.
    pub fn all(&self) -> Vec<Arc<CancelEntry>> {
        let mut v: Vec<_> = self.entries.lock().values().cloned().collect();
        v.sort_by_key(|e| e.pid);
        v
    }

    /// Kills every client of client-facing database `database`; returns how many.
    pub fn kill_database(&self, database: &str) -> usize {
        let victims: Vec<_> = self
            .entries
            .lock()
            .values()
            .filter(|e| e.client.database == database)
            .cloned()
            .collect();
        for e in &victims {
            e.kill();
        }
        victims.len()
    }

    pub fn unregister(&self, pid: i32) {
        self.entries.lock().remove(&pid);
    }

    pub fn secret_of(entry: &CancelEntry) -> i32 {
        entry.secret
    }

    /// Handles a CancelRequest from a client connection.
    pub async fn cancel(&self, pid: i32, secret: i32) -> CancelOutcome {
        let Some(entry) = self.entries.lock().get(&pid).cloned() else {
            return CancelOutcome::Unknown;
        };
        if !bool::from(entry.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return CancelOutcome::Unknown;
        }
        let (target, age) = {
            let mut s = entry.state.lock();
            match s.running {
                Some(t) => {
                    s.in_flight += 1;
                    (t, s.started.map(|t| t.elapsed()))
                }
                None => {
                    drop(s);
                    return if entry.queued.load(Ordering::Acquire) {
                        // Not notify_one: its stored permit would cancel a later query
                        // when the session leaves the queue at this very moment.
                        entry.queued_cancel.notify_waiters();
                        CancelOutcome::Queued
                    } else {
                        CancelOutcome::Idle
                    };
                }
            }
        };
        let res = send_cancel(target, Duration::from_secs(5)).await;
        {
            let mut s = entry.state.lock();
            s.in_flight -= 1;
        }
        entry.delivered.notify_waiters();
        metrics::counter!(crate::metrics::CANCELS_TOTAL, "pool" => entry.pool.to_string(), "cause" => "client_request")
            .increment(1);
        match res {
            Ok(()) => {
                tracing::info!(
                    cause = "client_request",
                    identity = %entry.identity,
                    pool = %entry.pool,
                    age_ms = age.map(|a| a.as_millis() as u64),
                    "cancel forwarded to upstream"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, backend_pid = target.pid, "could not deliver cancel to upstream")
            }
        }
        CancelOutcome::Forwarded
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to a backend and waits until the postmaster has processed it
/// (it closes the connection after signalling the backend).
pub async fn send_cancel(target: BackendTarget, timeout: Duration) -> std::io::Result<()> {
    let fut = async {
        let mut s = TcpStream::connect(target.addr).await?;
        s.write_all(&crate::protocol::cancel_request(target.pid, target.secret))
            .await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "cancel timed out",
            ))
        })
}

#[cfg(test)]
impl ClientInfo {
    fn test() -> Self {
        ClientInfo {
            user: "u".into(),
            database: "db".into(),
            application_name: "app".into(),
            peer: None,
            local: None,
            connected: std::time::SystemTime::now(),
            tls: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrong_secret_or_idle_is_dropped() {
        let reg = Arc::new(CancelRegistry::new());
        let e = reg.register("db/u".into(), "app".into(), ClientInfo::test());
        let secret = CancelRegistry::secret_of(&e);
        e.queued.store(true, Ordering::Release);
        assert_eq!(
            reg.cancel(e.pid, secret.wrapping_add(1)).await,
            CancelOutcome::Unknown
        );
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Queued);
        e.queued.store(false, Ordering::Release);
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Idle);
        e.start_query(BackendTarget {
            addr: "127.0.0.1:1".parse().unwrap(),
            pid: 1,
            secret: 2,
        });
        e.end_query();
        // The query ended before the cancel: nothing is sent anywhere.
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Idle);
        reg.unregister(e.pid);
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Unknown);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_cancel_that_misses_the_queue_does_not_cancel_the_next_query() {
        let reg = Arc::new(CancelRegistry::new());
        let e = reg.register("db/u".into(), "app".into(), ClientInfo::test());
        let secret = CancelRegistry::secret_of(&e);
        // The cancel finds the query queued just as the session leaves the queue.
        e.set_queued(true);
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Queued);
        e.set_queued(false);
        // The next query queues: nothing cancels it.
        let next = e.queued_cancelled();
        tokio::pin!(next);
        next.as_mut().enable();
        e.set_queued(true);
        let woke = tokio::time::timeout(Duration::from_millis(50), next.as_mut()).await;
        assert!(
            woke.is_err(),
            "an earlier cancel woke the next queued query"
        );
        // A cancel while it waits still reaches it.
        assert_eq!(reg.cancel(e.pid, secret).await, CancelOutcome::Queued);
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the cancel of the queued query wakes it");
    }
}
