//! A configuration run: a throwaway cluster, pgsluice in front of it (or not, for the
//! baseline that checks the oracle itself), the clients and the faults; then the final
//! checks straight against PostgreSQL and the summary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, ProxyProcess, TempPostgres};

use super::client::{self, Shared, Tally};
use super::faults::{self, FaultLog, Kind};
use super::model::{Model, PARAMS};
use super::script::Fail;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Straight to PostgreSQL: every answer must be correct, which validates the oracle.
    Direct,
    Session,
    Transaction,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub cancel: bool,
    pub kill: bool,
    pub terminate: bool,
    pub restart: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub name: &'static str,
    pub mode: Mode,
    /// `--pool-size`, `--max-active`; None leaves the proxy's default.
    pub pool_size: Option<usize>,
    pub max_active: Option<usize>,
    pub clients: usize,
    pub flags: Vec<&'static str>,
    pub faults: Faults,
    /// Reconnect after between this many operations.
    pub churn: Option<(u32, u32)>,
    /// Brief operations only (no pg_sleep, cancels, kills, MB rows).
    pub short: bool,
    /// The load is one the proxy must serve: any 53400 is a failure.
    pub shed_fails: bool,
    /// The upstream given as two hosts (`127.0.0.1` and `localhost`, one server, with
    /// `target_session_attrs=any`): the multi-host paths (role checks, host choice, the
    /// fit of pooled connections) under the oracle.
    pub two_hosts: bool,
    pub secs: f64,
}

impl Config {
    pub fn new(
        name: &'static str,
        mode: Mode,
        pool: Option<usize>,
        max_active: Option<usize>,
    ) -> Config {
        // Default: four clients per server connection (the proxy's default pool is 20).
        let clients = 4 * pool.unwrap_or(20);
        Config {
            name,
            mode,
            pool_size: pool,
            max_active,
            clients,
            flags: Vec::new(),
            faults: Faults::default(),
            churn: None,
            short: false,
            shed_fails: false,
            two_hosts: false,
            secs: secs_from_env(12.0),
        }
    }

    pub fn proxy_flags(&self) -> Vec<String> {
        let mut f: Vec<String> = Vec::new();
        let mode = match self.mode {
            Mode::Session => "session",
            _ => "transaction",
        };
        f.extend(["--pool-mode".into(), mode.into()]);
        if let Some(p) = self.pool_size {
            f.extend(["--pool-size".into(), p.to_string()]);
        }
        if let Some(a) = self.max_active {
            f.extend(["--max-active".into(), a.to_string()]);
        }
        f.extend(self.flags.iter().map(|s| s.to_string()));
        f
    }
}

/// Seconds per configuration: PGSLUICE_DIFF_SECS, else `default`.
pub fn secs_from_env(default: f64) -> f64 {
    std::env::var("PGSLUICE_DIFF_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(default)
        .clamp(1.0, 24.0 * 3600.0)
}

/// PGSLUICE_DIFF_SEED, else a random seed (printed in every summary and failure).
pub fn seed_from_env() -> u64 {
    std::env::var("PGSLUICE_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

pub struct Report {
    pub name: &'static str,
    pub seed: u64,
    pub secs: f64,
    pub clients: usize,
    pub setup: String,
    pub tally: Tally,
    pub terminations: usize,
    pub outages: usize,
}

impl Report {
    pub fn failures(&self) -> u64 {
        self.tally.failures.values().sum()
    }

    pub fn refused(&self) -> u64 {
        self.tally.refused.values().sum()
    }

    pub fn header() -> String {
        format!(
            "{:<28} {:>7} {:>8} {:>8} {:>8}  refused by SQLSTATE / failures by kind",
            "configuration", "ops", "correct", "refused", "failures"
        )
    }

    pub fn row(&self) -> String {
        let codes: Vec<String> = self
            .tally
            .refused
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let fails: Vec<String> = self
            .tally
            .failures
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let mut r = format!(
            "{:<28} {:>7} {:>8} {:>8} {:>8}  {}",
            self.name,
            self.tally.ops,
            self.tally.correct,
            self.refused(),
            self.failures(),
            if codes.is_empty() {
                "-".into()
            } else {
                codes.join(" ")
            }
        );
        if !fails.is_empty() {
            r.push_str(&format!(" / {}", fails.join(", ")));
        }
        r
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "differential {}: seed {} (PGSLUICE_DIFF_SEED={}), {:.0} s, {} clients, {}; \
             {} connects, {} backend terminations, {} upstream outages\n{}\n{}\n",
            self.name,
            self.seed,
            self.seed,
            self.secs,
            self.clients,
            self.setup,
            self.tally.connects,
            self.terminations,
            self.outages,
            Report::header(),
            self.row()
        );
        let per_op: Vec<String> = self
            .tally
            .per_op
            .iter()
            .map(|(k, [ok, refused, failed])| format!("{k} {ok}/{refused}/{failed}"))
            .collect();
        out.push_str(&format!(
            "  per op (correct/refused/failed): {}\n",
            per_op.join(", ")
        ));
        for d in self.tally.details.values() {
            out.push_str(&format!("FAILURE [{}] {d}\n", self.name));
        }
        out
    }
}

fn merge(into: &mut Tally, t: Tally) {
    into.ops += t.ops;
    into.correct += t.correct;
    into.connects += t.connects;
    for (k, v) in t.refused {
        *into.refused.entry(k).or_default() += v;
    }
    for (k, v) in t.failures {
        *into.failures.entry(k).or_default() += v;
    }
    for (k, v) in t.per_op {
        let e = into.per_op.entry(k).or_default();
        for i in 0..3 {
            e[i] += v[i];
        }
    }
    let keep = std::env::var("PGSLUICE_DIFF_DETAILS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    for (k, d) in t.details {
        let base = k.split(" #").next().unwrap_or(&k).to_string();
        let have = into.details.keys().filter(|x| x.starts_with(&base)).count();
        if have < keep {
            into.details.insert(k, d);
        }
    }
}

async fn setup(pg: &TempPostgres, clients: usize) -> BTreeMap<&'static str, String> {
    let db = pg.client().await;
    db.batch_execute(&format!(
        "CREATE TABLE diff_rows(client int, k int, v bigint NOT NULL, PRIMARY KEY (client, k));
         CREATE TABLE diff_copy(client int NOT NULL, batch int NOT NULL, n int NOT NULL);
         CREATE TABLE diff_big(client int PRIMARY KEY, seq bigint NOT NULL, payload text NOT NULL);
         INSERT INTO diff_rows SELECT c, k, 0 FROM generate_series(0, {}) c, generate_series(0, {}) k;",
        clients - 1,
        super::model::K - 1
    ))
    .await
    .expect("create the tester's tables");
    let mut defaults = BTreeMap::new();
    for (name, _) in PARAMS {
        let rows = db
            .simple_query(&format!("SHOW {name}"))
            .await
            .expect("SHOW");
        let v = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        defaults.insert(*name, v.unwrap_or_default());
    }
    // What a session that sends no application_name has.
    defaults.insert("application_name", String::new());
    defaults
}

/// Checks the database against every client's model, straight on PostgreSQL.
async fn final_check(pg: &TempPostgres, models: &[Model], tally: &mut Tally, seed: u64) {
    let db = pg.client().await;
    let mut bad = Vec::new();
    for m in models {
        let c = m.cid as i32;
        let row = db
            .query_one(
                "SELECT string_agg(v::text, ',' ORDER BY k) FROM diff_rows WHERE client = $1",
                &[&c],
            )
            .await
            .expect("read rows");
        let got: String = row.get(0);
        if !m.row_states().contains(&got) {
            bad.push(format!(
                "client {c}: rows {got}, expected one of {:?}",
                m.row_states()
            ));
        }
        let rows = db
            .query(
                "SELECT batch, count(*), sum(n)::int8 FROM diff_copy WHERE client = $1 GROUP BY batch",
                &[&c],
            )
            .await
            .expect("read copies");
        let seen: BTreeMap<i32, (i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (b, batch) in &m.copies {
            let got = seen.get(&(*b as i32)).copied().unwrap_or((0, 0));
            let ok = got == (batch.rows, batch.sum) || (!batch.certain && got == (0, 0));
            if !ok {
                bad.push(format!(
                    "client {c}: COPY batch {b} holds {got:?}, expected {batch:?}"
                ));
            }
        }
        for b in seen.keys() {
            if !m.copies.contains_key(&(*b as u32)) {
                bad.push(format!(
                    "client {c}: COPY batch {b} exists but was never sent"
                ));
            }
        }
        if !m.big.is_empty() {
            let r = db
                .query_opt(
                    "SELECT seq, length(payload)::int8 FROM diff_big WHERE client = $1",
                    &[&c],
                )
                .await
                .expect("read big row");
            let got = r.map_or(super::bulk::NO_BIG, |r| {
                (r.get::<_, i64>(0), r.get::<_, i64>(1) as usize)
            });
            if !m.big.contains(&got) {
                bad.push(format!(
                    "client {c}: large row {got:?}, expected one of {:?}",
                    m.big
                ));
            }
        }
    }
    for b in bad {
        let key = Fail::Atomicity.label().to_string() + " (final check)";
        *tally.failures.entry(key.clone()).or_default() += 1;
        let d = tally.details.entry(key).or_default();
        if d.lines().count() < 5 {
            d.push_str(&format!("final check, seed {seed}: {b}\n"));
        }
    }
}

/// After every client left: nothing may be left running or inside a transaction upstream,
/// and the proxy must count no clients.
async fn leak_check(pg: &TempPostgres, proxy: Option<&ProxyProcess>, tally: &mut Tally) {
    let db = pg.client().await;
    let t0 = Instant::now();
    let sql = "SELECT pid, state, left(query, 80) FROM pg_stat_activity \
               WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
               AND (state <> 'idle' OR wait_event_type = 'Lock')";
    let mut last;
    loop {
        let rows = db.query(sql, &[]).await.expect("pg_stat_activity");
        let clients = match proxy {
            Some(p) => p.pools().await["clients"]["total"]
                .as_u64()
                .unwrap_or(u64::MAX),
            None => 0,
        };
        if rows.is_empty() && clients == 0 {
            return;
        }
        last = format!(
            "proxy clients {clients}; busy backends: {:?}",
            rows.iter()
                .map(|r| format!(
                    "{} {} {}",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2)
                ))
                .collect::<Vec<_>>()
        );
        if t0.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    *tally.failures.entry(Fail::Leak.label().into()).or_default() += 1;
    tally.details.insert(
        Fail::Leak.label().into(),
        format!("10 s after all clients left: {last}"),
    );
}

pub async fn run(cfg: &Config, seed: u64) -> Report {
    common::raise_fd_limit();
    // Commits must survive an immediate stop or kill -9 (the harness's default does not wait
    // for the WAL write), or the oracle would see committed rows vanish.
    let pg = tokio::task::spawn_blocking(|| {
        TempPostgres::builder()
            .setting("synchronous_commit", "on")
            .spawn()
    })
    .await
    .expect("start cluster");
    let pg = Arc::new(pg);
    let defaults = Arc::new(setup(&pg, cfg.clients).await);
    let flags = cfg.proxy_flags();
    let proxy = match cfg.mode {
        Mode::Direct => None,
        _ => {
            let f: Vec<&str> = flags.iter().map(String::as_str).collect();
            let upstream = if cfg.two_hosts {
                format!(
                    "postgres://postgres@127.0.0.1:{p},localhost:{p}/postgres?target_session_attrs=any",
                    p = pg.port()
                )
            } else {
                pg.url()
            };
            Some(ProxyProcess::start(&upstream, &f).await)
        }
    };
    let addr = proxy.as_ref().map_or(pg.addr(), |p| p.addr());
    let log = Arc::new(FaultLog::default());
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(cfg.secs);
    let shared = Arc::new(Shared {
        addr,
        faults: log.clone(),
        defaults,
        seed,
        deadline,
        max_ops: 1_000_000,
        per_op_exposure: cfg.mode == Mode::Transaction,
        cancels: cfg.faults.cancel,
        kills: cfg.faults.kill,
        short: cfg.short,
        shed_ok: !cfg.shed_fails,
        churn: cfg.churn,
    });
    let mut fault_tasks = Vec::new();
    if cfg.faults.terminate {
        fault_tasks.push(tokio::spawn(faults::terminator(
            pg.clone(),
            log.clone(),
            seed,
            deadline,
        )));
    }
    if cfg.faults.restart {
        fault_tasks.push(tokio::spawn(faults::restarter(
            pg.clone(),
            log.clone(),
            seed,
            deadline,
        )));
    }
    let handles: Vec<_> = (0..cfg.clients as u32)
        .map(|cid| tokio::spawn(client::run(shared.clone(), cid)))
        .collect();
    let mut tally = Tally::default();
    let mut models = Vec::new();
    // Every client ends within the deadline plus one bounded operation.
    let limit = deadline + Duration::from_secs(40);
    for (cid, h) in handles.into_iter().enumerate() {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(limit.into(), h).await {
            Ok(Ok((m, t))) => {
                models.push(m);
                merge(&mut tally, t);
            }
            Ok(Err(e)) => panic!("client {cid} panicked: {e}"),
            Err(_) => {
                abort.abort();
                *tally
                    .failures
                    .entry("stall (client never finished)".into())
                    .or_default() += 1;
            }
        }
    }
    for f in fault_tasks {
        let _ = f.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    final_check(&pg, &models, &mut tally, seed).await;
    leak_check(&pg, proxy.as_ref(), &mut tally).await;
    if tally.failures.keys().any(|k| k.starts_with("leak")) {
        if let Some(p) = &proxy {
            tally.details.insert(
                "proxy log".into(),
                format!("proxy log tail:\n{}", p.log_tail()),
            );
        }
    }
    let setup = match cfg.mode {
        Mode::Direct => "direct to PostgreSQL".to_string(),
        _ => format!("pgsluice {}", flags.join(" ")),
    };
    let faults = cfg.faults;
    let setup = format!(
        "{setup}; faults: {}",
        [
            ("brief operations only", cfg.short),
            ("53400 is a failure", cfg.shed_fails),
            ("cancels", faults.cancel),
            ("client kills", faults.kill),
            ("pg_terminate_backend", faults.terminate),
            ("upstream stop/start and kill -9", faults.restart),
        ]
        .iter()
        .filter(|f| f.1)
        .map(|f| f.0)
        .collect::<Vec<_>>()
        .join(", ")
    );
    if let Some(p) = proxy {
        p.terminate(Duration::from_secs(10));
    }
    Report {
        name: cfg.name,
        seed,
        secs,
        clients: cfg.clients,
        setup,
        tally,
        terminations: log.count(Kind::Terminate),
        outages: log.count(Kind::Outage),
    }
}

/// Runs a configuration and fails the test on any failure, printing the summary either way.
pub async fn check(cfg: Config) {
    let seed = seed_from_env();
    let report = run(&cfg, seed).await;
    let text = report.text();
    if report.failures() > 0 {
        panic!("{} failures\n{text}", report.failures());
    }
    eprintln!("{text}");
    assert!(report.tally.correct > 0, "no operation succeeded\n{text}");
}
