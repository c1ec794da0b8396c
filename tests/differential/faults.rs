//! Server-side faults and the log the oracle consults: an error that says "your server went
//! away" is only a documented outcome if a server did go away while the client was exposed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::TempPostgres;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// pg_terminate_backend of one backend.
    Terminate,
    /// The upstream stopped (fast, immediate, or its postmaster killed) and started again.
    Outage,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    kind: Kind,
    start: Instant,
    end: Instant,
}

/// After a termination, how long its effects may still arrive (the FATAL is read late).
const TERMINATE_TAIL: Duration = Duration::from_millis(250);
/// After an outage: the breaker's cool-down, health checks, reconnects.
const OUTAGE_TAIL: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct FaultLog {
    events: Mutex<Vec<Event>>,
    open: Mutex<Vec<(Kind, Instant)>>,
}

impl FaultLog {
    /// Marks a fault as begun; `end` closes it.
    pub fn begin(&self, kind: Kind) -> Instant {
        let t = Instant::now();
        self.open.lock().unwrap().push((kind, t));
        t
    }

    pub fn end(&self, kind: Kind, start: Instant) {
        self.open
            .lock()
            .unwrap()
            .retain(|(k, s)| !(*k == kind && *s == start));
        self.events.lock().unwrap().push(Event {
            kind,
            start,
            end: Instant::now(),
        });
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }

    /// Whether `code` is explained by a fault that overlapped [since, now].
    pub fn excuses(&self, code: &str, since: Instant) -> bool {
        let covers = |kind: Kind| -> bool {
            match kind {
                Kind::Terminate => matches!(code, "57P01" | "08006"),
                Kind::Outage => matches!(code, "57P01" | "57P02" | "57P03" | "08006"),
            }
        };
        if self.open.lock().unwrap().iter().any(|(k, _)| covers(*k)) {
            return true;
        }
        self.events.lock().unwrap().iter().any(|e| {
            let tail = match e.kind {
                Kind::Terminate => TERMINATE_TAIL,
                Kind::Outage => OUTAGE_TAIL,
            };
            covers(e.kind) && e.end + tail >= since
        })
    }
}

/// Terminates a random client backend every 0.3-1.2 s until `deadline`.
pub async fn terminator(pg: Arc<TempPostgres>, log: Arc<FaultLog>, seed: u64, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7e3a);
    let mut db: Option<tokio_postgres::Client> = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        if !matches!(&db, Some(c) if !c.is_closed()) {
            db = crate::common::try_connect(&pg.url()).await.ok();
        }
        let Some(c) = &db else { continue };
        // Only sessions of the tester's tables' database user, never the asking session.
        let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                   WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                   AND datname = 'postgres' ORDER BY random() LIMIT 1";
        let t = log.begin(Kind::Terminate);
        let _ = tokio::time::timeout(Duration::from_secs(5), c.simple_query(sql)).await;
        log.end(Kind::Terminate, t);
    }
}

/// Stops and starts the upstream every 2.5-5 s: fast stop, immediate stop, and kill -9 of
/// the postmaster, in turn.
pub async fn restarter(pg: Arc<TempPostgres>, log: Arc<FaultLog>, seed: u64, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e5e);
    let mut n = 0u32;
    loop {
        let wait = Duration::from_millis(rng.gen_range(2500..5000));
        if Instant::now() + wait + Duration::from_secs(2) >= deadline {
            return;
        }
        tokio::time::sleep(wait).await;
        let how = n % 3;
        n += 1;
        let t = log.begin(Kind::Outage);
        let pg2 = pg.clone();
        let r = tokio::task::spawn_blocking(move || {
            match how {
                0 => pg2.stop(),
                1 => pg2.kill_immediate(),
                _ => kill9_postmaster(&pg2),
            }
            pg2.start();
        })
        .await;
        log.end(Kind::Outage, t);
        if r.is_err() {
            eprintln!("differential: restarting the upstream failed");
            return;
        }
    }
}

/// SIGKILL to the postmaster; its orphaned children notice and exit, and must be gone
/// before a new postmaster can take the data directory.
fn kill9_postmaster(pg: &TempPostgres) {
    let children = pg.backend_pids();
    let Some(pm) = pg.postmaster_pid() else {
        return;
    };
    // SAFETY: kill(2) on the postmaster of our own throwaway cluster.
    unsafe {
        libc::kill(pm, libc::SIGKILL);
    }
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let t0 = Instant::now();
    while (alive(pm) || children.iter().any(|&p| alive(p))) && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in children.iter().filter(|&&p| alive(p)) {
        // SAFETY: as above, a leftover child of that postmaster.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
}
