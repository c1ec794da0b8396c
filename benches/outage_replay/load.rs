//! The simulated application: a bounded set of virtual users (each with its own connection),
//! requests of K sequential queries, a client deadline after which the connection is dropped,
//! and one retry after a jittered backoff.

use rand::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

/// The work each query does: a range sum over pgbench_accounts, a few ms of real CPU.
pub const QUERY: &str =
    "SELECT sum(abalance) FROM pgbench_accounts WHERE aid BETWEEN $1 AND $1 + $2";

#[derive(Clone, Debug)]
pub struct Workload {
    pub queries: usize,
    /// Rows summed by each query.
    pub span: i32,
    /// Highest aid in pgbench_accounts.
    pub max_aid: i32,
    pub deadline: Duration,
    pub backoff: Duration,
}

/// One open connection; dropping it closes the socket at once, abandoning any query in flight.
pub struct Conn {
    client: Client,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn connect(url: &str) -> Result<Conn, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| classify(&e))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { client, task })
}

impl Conn {
    /// One query of the workload.
    pub async fn sum_range(&self, aid: i32, span: i32) -> Result<(), String> {
        self.client
            .query_typed(QUERY, &[(&aid, Type::INT4), (&span, Type::INT4)])
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    /// First column of a one-row bigint query.
    pub async fn count(&self, sql: &str) -> Result<Option<i64>, tokio_postgres::Error> {
        let row = self.client.query_one(sql, &[]).await?;
        row.try_get::<_, Option<i64>>(0)
    }
}

/// SQLSTATE when the server sent one, else a short word for the failure.
pub fn classify(e: &tokio_postgres::Error) -> String {
    if let Some(code) = e.code() {
        return code.code().to_string();
    }
    if e.is_closed() {
        return "closed".into();
    }
    let s = e.to_string();
    if s.contains("refused") || s.contains("connect") {
        "connect".into()
    } else {
        "io".into()
    }
}

/// Runs the K queries of one request on `conn`.
pub async fn run_request(conn: &Conn, w: &Workload) -> Result<(), String> {
    for _ in 0..w.queries {
        let hi = (w.max_aid - w.span).max(1);
        let aid = rand::thread_rng().gen_range(1..=hi);
        conn.sum_range(aid, w.span).await?;
    }
    Ok(())
}

/// The application's connections: at most `vus` requests in flight, idle connections reused.
pub struct App {
    url: String,
    slots: Arc<Semaphore>,
    idle: parking_lot::Mutex<Vec<Conn>>,
}

impl App {
    pub fn new(url: &str, vus: usize) -> Self {
        App {
            url: url.to_string(),
            slots: Arc::new(Semaphore::new(vus.max(1))),
            idle: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// One attempt bounded by the deadline: wait for a virtual user, connect if it has no
    /// connection, run the queries. On timeout the connection is dropped (never reused).
    async fn attempt(&self, w: &Workload) -> Result<(), String> {
        let until = tokio::time::Instant::now() + w.deadline;
        let Ok(permit) = tokio::time::timeout_at(until, self.slots.acquire()).await else {
            return Err("client_no_vu".into());
        };
        let _permit = permit.map_err(|_| "closed".to_string())?;
        let cached = self.idle.lock().pop();
        let conn = match cached {
            Some(c) => c,
            None => match tokio::time::timeout_at(until, connect(&self.url)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("client_deadline".into()),
            },
        };
        match tokio::time::timeout_at(until, run_request(&conn, w)).await {
            Ok(Ok(())) => {
                self.idle.lock().push(conn);
                Ok(())
            }
            Ok(Err(code)) => {
                // A server-side error leaves the session usable; a lost socket does not.
                if code != "closed" && code != "io" && !code.starts_with("08") {
                    self.idle.lock().push(conn);
                }
                Err(code)
            }
            Err(_) => Err("client_deadline".into()),
        }
    }

    /// A full request with one retry; returns the outcome for the step's statistics.
    pub async fn request(&self, w: &Workload, arrived: Instant) -> Outcome {
        let mut errors = Vec::new();
        for attempt in 0..2 {
            if attempt == 1 {
                let base = w.backoff.as_secs_f64();
                let jitter = rand::thread_rng().gen_range(0.5..1.5);
                tokio::time::sleep(Duration::from_secs_f64(base * jitter)).await;
            }
            match self.attempt(w).await {
                Ok(()) => {
                    return Outcome {
                        ok: true,
                        retried: attempt == 1,
                        latency: arrived.elapsed(),
                        errors,
                    }
                }
                Err(code) => errors.push(code),
            }
        }
        Outcome {
            ok: false,
            retried: true,
            latency: arrived.elapsed(),
            errors,
        }
    }

    pub fn close_idle(&self) {
        self.idle.lock().clear();
    }
}

pub struct Outcome {
    pub ok: bool,
    pub retried: bool,
    pub latency: Duration,
    /// One entry per failed attempt.
    pub errors: Vec<String>,
}

/// What one load step saw.
#[derive(Default, Debug, Clone)]
pub struct StepStats {
    pub arrivals: u64,
    pub success: u64,
    pub failed: u64,
    pub retries: u64,
    /// Arrivals refused because too many requests were already in flight in the generator.
    pub overflow: u64,
    pub lat_us: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub active: Vec<i64>,
}

impl StepStats {
    pub fn record(&mut self, o: Outcome) {
        if o.retried {
            self.retries += 1;
        }
        for e in o.errors {
            *self.errors.entry(e).or_default() += 1;
        }
        if o.ok {
            self.success += 1;
            self.lat_us.push(o.latency.as_micros() as u64);
        } else {
            self.failed += 1;
        }
    }

    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.lat_us.is_empty() {
            return None;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() as f64 * p).ceil() as usize).clamp(1, self.lat_us.len()) - 1;
        Some(self.lat_us[i] as f64 / 1000.0)
    }

    pub fn active_mean_max(&self) -> (f64, i64) {
        if self.active.is_empty() {
            return (0.0, 0);
        }
        let sum: i64 = self.active.iter().sum();
        (
            sum as f64 / self.active.len() as f64,
            *self.active.iter().max().unwrap_or(&0),
        )
    }
}
