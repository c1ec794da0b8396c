//! Client loops that keep the proxy busy and tally what came back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::common::{connect, TestProxy};

#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub shed: AtomicU64,
    pub unavailable: AtomicU64,
    pub other: AtomicU64,
    /// Shed count by the reason named in the HINT.
    pub reasons: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    pub fn record(
        &self,
        res: &Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    ) {
        let counter = match res {
            Ok(_) => &self.ok,
            Err(e) if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {
                let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default();
                let reason = hint
                    .split_once('(')
                    .and_then(|(_, r)| r.split_once(')'))
                    .map_or("?", |(r, _)| r);
                *self.reasons.lock().entry(reason.to_string()).or_default() += 1;
                &self.shed
            }
            Err(e) if e.code() == Some(&SqlState::CANNOT_CONNECT_NOW) => &self.unavailable,
            Err(e) => {
                eprintln!("unexpected error: {e:?}");
                &self.other
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.shed.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

/// `n` clients of identity `app` loop `sql` until `stop`; returns their tasks, each yielding
/// the latencies of its successful queries.
pub async fn spawn_loopers(
    proxy: &TestProxy,
    app: &str,
    n: usize,
    sql: &'static str,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<Vec<Duration>>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = connect(&proxy.url_with_app(app)).await;
        let (stop, tally) = (stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let res = c.simple_query(sql).await;
                tally.record(&res);
                match res {
                    Ok(_) => lat.push(t.elapsed()),
                    // A shed query never ran; back off a little before retrying.
                    Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
            lat
        }));
    }
    tasks
}

pub async fn join_all(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut all = Vec::new();
    for t in tasks {
        let lat = tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("client loop hung")
            .expect("client loop panicked");
        all.extend(lat);
    }
    all
}
