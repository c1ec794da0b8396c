//! One simulated client: picks operations at random (seeded), runs each against its
//! connection, judges the outcome and keeps its model in step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::faults::FaultLog;
use super::model::{Batch, Model, Plan, REPORTED};
use super::script::{execute, Exp, Fail, Outcome, Policy, Script, STALL};
use super::wire::{Conn, ConnectErr};
use super::{bulk, ops, session, txn};

type OpFn = fn(&mut Model, &mut StdRng) -> Plan;

/// Operations and their weights. `cancel` and `kill` only where the configuration allows.
pub const OPS: &[(&str, u32, OpFn)] = &[
    ("select", 10, ops::select),
    ("multi", 5, ops::multi),
    ("empty", 2, ops::empty),
    ("extended", 8, ops::extended),
    ("portal", 3, ops::portal),
    ("pipeline", 7, ops::pipeline),
    ("syncs", 5, ops::syncs),
    ("flush", 2, ops::flush),
    ("unnamed_split", 5, ops::unnamed_split),
    ("named", 8, session::named),
    ("params", 7, session::params),
    ("notice", 3, ops::notice),
    ("copy_in", 4, bulk::copy_in),
    ("copy_out", 3, bulk::copy_out),
    ("big", 2, bulk::big),
    ("sleep", 3, bulk::sleep),
    ("transaction", 14, txn::transaction),
    ("verify", 4, bulk::verify),
    ("cancel", 3, txn::cancel),
    ("kill", 2, txn::kill),
];

/// What the clients of one run share.
pub struct Shared {
    pub addr: std::net::SocketAddr,
    pub faults: Arc<FaultLog>,
    pub defaults: Arc<BTreeMap<&'static str, String>>,
    pub seed: u64,
    pub deadline: Instant,
    pub max_ops: u64,
    /// Transaction pooling: exposure to server faults starts with each operation; otherwise
    /// the client has one server for its whole connection.
    pub per_op_exposure: bool,
    pub cancels: bool,
    pub kills: bool,
    /// Only operations that run briefly (no pg_sleep, cancels, kills or MB rows).
    pub short: bool,
    /// Whether the guard may refuse with 53400 (outside transactions).
    pub shed_ok: bool,
    /// Reconnect after this many operations (session-mode churn), if set.
    pub churn: Option<(u32, u32)>,
}

/// One client's counts and the failures it saw.
#[derive(Default)]
pub struct Tally {
    pub ops: u64,
    pub correct: u64,
    pub refused: BTreeMap<String, u64>,
    pub failures: BTreeMap<String, u64>,
    /// The first failure of each kind, with the client's transcript.
    pub details: BTreeMap<String, String>,
    pub per_op: BTreeMap<&'static str, [u64; 3]>,
    pub connects: u64,
}

impl Tally {
    fn fail(&mut self, sh: &Shared, cid: u32, op: &str, kind: Fail, detail: &str, log: &str) {
        let key = format!("{} ({op})", kind.label());
        let n = self.failures.entry(key.clone()).or_default();
        *n += 1;
        // PGSLUICE_DIFF_DETAILS: how many failures of each kind to report in full per client.
        let keep = std::env::var("PGSLUICE_DIFF_DETAILS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1u64);
        if *n <= keep {
            let key = format!("{key} #{cid}.{n}");
            self.details.insert(key, format!(
                "client {cid}, op #{} {op}: {}: {detail}\n  seed {} (PGSLUICE_DIFF_SEED={})\n  last messages of client {cid}:\n{log}",
                self.ops,
                kind.label(),
                sh.seed,
                sh.seed
            ));
        }
    }
}

fn client_seed(seed: u64, cid: u32) -> u64 {
    seed ^ (cid as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn pick(rng: &mut StdRng, sh: &Shared) -> (&'static str, OpFn) {
    let allowed = |name: &str| match name {
        "cancel" => sh.cancels && !sh.short,
        "kill" => sh.kills && !sh.short,
        "sleep" | "big" => !sh.short,
        _ => true,
    };
    let total: u32 = OPS.iter().filter(|o| allowed(o.0)).map(|o| o.1).sum();
    let mut x = rng.gen_range(0..total);
    for &(name, w, f) in OPS.iter().filter(|o| allowed(o.0)) {
        if x < w {
            return (name, f);
        }
        x -= w;
    }
    unreachable!()
}

/// Runs one client until the deadline; returns its model (for the final check) and tally.
pub async fn run(sh: Arc<Shared>, cid: u32) -> (Model, Tally) {
    let mut rng = StdRng::seed_from_u64(client_seed(sh.seed, cid));
    let mut m = Model::new(cid, sh.defaults.clone());
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    let mut must_verify = false;
    let mut left = 0u32;
    while Instant::now() < sh.deadline && t.ops < sh.max_ops {
        let Some(c) = conn.as_mut() else {
            conn = connect(&sh, &mut m, &mut rng, &mut t, cid).await;
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else if let Some((lo, hi)) = sh.churn {
                left = rng.gen_range(lo..=hi);
            }
            continue;
        };
        let (name, plan) = if must_verify || !m.alts.is_empty() {
            must_verify = false;
            ("verify", bulk::verify(&mut m, &mut rng))
        } else {
            let (name, f) = pick(&mut rng, &sh);
            (name, f(&mut m, &mut rng))
        };
        let policy = Policy {
            faults: sh.faults.clone(),
            exposed_since: if sh.per_op_exposure {
                Instant::now()
            } else {
                c.opened
            },
            shed_ok: sh.shed_ok,
        };
        let run = execute(c, &plan.script, &policy).await;
        t.ops += 1;
        let slot = t.per_op.entry(name).or_default();
        let mut keep = true;
        match run.outcome {
            Outcome::Correct => {
                slot[0] += 1;
                t.correct += 1;
                apply(&mut m, &plan, &run.rows);
                if let Err(e) = reported_match(c, &m) {
                    let log = c.transcript();
                    t.fail(&sh, cid, name, Fail::WrongAnswer, &e, &log);
                    keep = false;
                }
            }
            Outcome::Refused { code, closed } => {
                slot[1] += 1;
                *t.refused.entry(code).or_default() += 1;
                uncertain(&mut m, &plan, run.commit_sent);
                keep = !closed && plan.script.pure;
                must_verify = plan.rows_after.is_some();
                // As an application would: a refused request is retried after a pause.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Outcome::Failed { kind, detail } => {
                slot[2] += 1;
                let log = c.transcript();
                t.fail(&sh, cid, name, kind, &detail, &log);
                uncertain(&mut m, &plan, run.commit_sent);
                keep = false;
                must_verify = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Outcome::Killed => {
                slot[0] += 1;
                t.correct += 1;
                if let Some((b, batch)) = plan.copy {
                    m.copies.insert(b, batch);
                }
                keep = false;
                must_verify = true;
            }
        }
        if keep && c.status != b'I' {
            keep = rollback(c, &policy, &sh, cid, &mut t).await;
        }
        if keep && sh.churn.is_some() {
            left = left.saturating_sub(1);
            keep = left > 0;
        }
        if !keep {
            if let Some(c) = conn.take() {
                c.kill();
            }
        }
    }
    if let Some(c) = conn.take() {
        c.terminate().await;
    }
    (m, t)
}

async fn connect(
    sh: &Shared,
    m: &mut Model,
    rng: &mut StdRng,
    t: &mut Tally,
    cid: u32,
) -> Option<Conn> {
    let params = m.new_session(rng);
    let since = Instant::now();
    t.connects += 1;
    match Conn::connect(sh.addr, &params, STALL + Duration::from_secs(5)).await {
        Ok(c) => {
            if let Err(e) = reported_match(&c, m) {
                let log = c.transcript();
                t.ops += 1;
                t.fail(sh, cid, "connect", Fail::WrongAnswer, &e, &log);
            }
            Some(c)
        }
        Err(ConnectErr::Refused(f)) => {
            t.ops += 1;
            let policy = Policy {
                faults: sh.faults.clone(),
                exposed_since: since,
                shed_ok: sh.shed_ok,
            };
            match policy.judge(&f, false, &[]) {
                Ok(()) => *t.refused.entry(f.label()).or_default() += 1,
                Err(why) => {
                    let detail = format!("startup refused: {} {}: {why}", f.code, f.message);
                    t.fail(sh, cid, "connect", Fail::UndocumentedError, &detail, "");
                }
            }
            None
        }
        Err(ConnectErr::Wire(e)) => {
            t.ops += 1;
            let kind = match e {
                super::wire::WireErr::Timeout => Fail::Stall,
                _ => Fail::Transport,
            };
            let detail = format!("startup: {e} (startup parameters {params:?})");
            t.fail(sh, cid, "connect", kind, &detail, "");
            None
        }
    }
}

/// Leaves a transaction a refused operation left open; false when the connection is lost.
async fn rollback(c: &mut Conn, policy: &Policy, sh: &Shared, cid: u32, t: &mut Tally) -> bool {
    let mut s = Script::new("rollback");
    s.out().query("ROLLBACK");
    s.exp(Exp::Complete("ROLLBACK".into()));
    s.exp(Exp::Ready(b'I'));
    match execute(c, &s, policy).await.outcome {
        Outcome::Correct => true,
        Outcome::Failed { kind, detail } => {
            let log = c.transcript();
            t.fail(sh, cid, "rollback", kind, &detail, &log);
            false
        }
        _ => false,
    }
}

/// The client's view of reported parameters must be the session's values.
fn reported_match(c: &Conn, m: &Model) -> Result<(), String> {
    for &name in REPORTED {
        let want = m.value(name);
        match c.reported.get(name) {
            Some(v) if *v == want => {}
            got => {
                return Err(format!(
                    "ParameterStatus says {name} = {got:?}, but the session's value is {want:?}"
                ))
            }
        }
    }
    Ok(())
}

fn apply(m: &mut Model, p: &Plan, rows: &[Vec<Option<bytes::Bytes>>]) {
    if let Some(r) = &p.rows_after {
        m.rows = r.clone();
    }
    if let Some((b, batch)) = p.copy {
        m.copies.insert(b, batch);
    }
    if let Some(big) = p.big_after {
        m.big = vec![big];
    }
    if let Some((stmts, params)) = &p.session_after {
        m.stmts = stmts.clone();
        m.params = params.clone();
    }
    if p.resolves_rows {
        if let Some(Some(text)) = rows.first().and_then(|r| r.first()) {
            let text = String::from_utf8_lossy(text).into_owned();
            let ok = m.resolve_rows(&text);
            debug_assert!(ok, "a matched row state is one of the model's");
        }
    }
    if p.resolves_big {
        if let Some(Some(seq)) = rows.first().and_then(|r| r.first()) {
            let seq: i64 = String::from_utf8_lossy(seq).parse().unwrap_or(-1);
            m.big.retain(|&(s, _)| s == seq);
        }
    }
}

/// After an answer that never came: what was sent up to the commit point may or may not
/// have committed, but only all of it or none of it.
fn uncertain(m: &mut Model, p: &Plan, commit_sent: bool) {
    if !commit_sent {
        if let Some((b, _)) = p.copy {
            m.copies.insert(
                b,
                Batch {
                    rows: 0,
                    sum: 0,
                    certain: true,
                },
            );
        }
        return;
    }
    if let Some(r) = &p.rows_after {
        if *r != m.rows && !m.alts.contains(r) {
            m.alts.push(r.clone());
        }
    }
    if let Some((b, batch)) = p.copy {
        m.copies.insert(
            b,
            Batch {
                certain: false,
                ..batch
            },
        );
    }
    if let Some(big) = p.big_after {
        if m.big.is_empty() {
            m.big.push(bulk::NO_BIG);
        }
        if !m.big.contains(&big) {
            m.big.push(big);
        }
    }
}
