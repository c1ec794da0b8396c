//! Explicit transactions (savepoints, ROLLBACK TO, errors and 25P02, COMMIT of an aborted
//! transaction) sent in every grouping a client may use, and the client-side faults: cancels
//! and clients killed mid-query, mid-transaction and mid-COPY.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use super::model::{rows_text, Batch, Model, Plan, UNTRACKED};
use super::ops::DIV0;
use super::script::{text_row, Exp, Item, Script};

enum Res {
    Rows(usize, Vec<Vec<String>>, String),
    Tag(String),
    Notices(Vec<String>, String),
    /// An error raised when the statement runs.
    Err(&'static str),
    /// An error raised already at Parse (25P02 in an aborted transaction).
    ParseErr(&'static str),
}

struct Step {
    sql: String,
    res: Res,
}

impl Step {
    fn exps(&self, simple: bool) -> Vec<Exp> {
        let mut out = Vec::new();
        let ext = |out: &mut Vec<Exp>| {
            if !simple {
                out.push(Exp::ParseComplete);
                out.push(Exp::BindComplete);
            }
        };
        match &self.res {
            Res::Rows(cols, rows, tag) => {
                ext(&mut out);
                if simple {
                    out.push(Exp::RowDesc(*cols));
                }
                for r in rows {
                    let r: Vec<&str> = r.iter().map(String::as_str).collect();
                    out.push(Exp::Row(text_row(&r)));
                }
                out.push(Exp::Complete(tag.clone()));
            }
            Res::Tag(tag) => {
                ext(&mut out);
                out.push(Exp::Complete(tag.clone()));
            }
            Res::Notices(msgs, tag) => {
                ext(&mut out);
                out.extend(msgs.iter().map(|m| Exp::Notice(m.clone())));
                out.push(Exp::Complete(tag.clone()));
            }
            Res::Err(code) => {
                // The simple protocol describes the row before running into the error.
                ext(&mut out);
                if simple {
                    out.push(Exp::RowDesc(1));
                }
                out.push(Exp::Error(code));
            }
            Res::ParseErr(code) => out.push(Exp::Error(code)),
        }
        out
    }

    fn fails(&self) -> bool {
        matches!(self.res, Res::Err(_) | Res::ParseErr(_))
    }
}

/// The transaction as the server sees it, advanced statement by statement.
struct Tx {
    c: u32,
    cur: Vec<i64>,
    saves: Vec<(String, Vec<i64>)>,
    aborted: bool,
    done: bool,
    committed: bool,
}

fn tag(t: &str) -> Res {
    Res::Tag(t.to_string())
}

impl Tx {
    fn status(&self) -> u8 {
        match (self.done, self.aborted) {
            (true, _) => b'I',
            (false, true) => b'E',
            (false, false) => b'T',
        }
    }

    fn end(&mut self, rng: &mut StdRng) -> Step {
        self.done = true;
        if self.aborted {
            // COMMIT of an aborted transaction rolls back and says so.
            let sql = if rng.gen_bool(0.5) {
                "COMMIT"
            } else {
                "ROLLBACK"
            };
            return Step {
                sql: sql.into(),
                res: tag("ROLLBACK"),
            };
        }
        if rng.gen_bool(0.7) {
            self.committed = true;
            Step {
                sql: "COMMIT".into(),
                res: tag("COMMIT"),
            }
        } else {
            Step {
                sql: "ROLLBACK".into(),
                res: tag("ROLLBACK"),
            }
        }
    }

    fn next(&mut self, m: &mut Model, rng: &mut StdRng) -> Step {
        let c = self.c;
        if self.aborted {
            if !self.saves.is_empty() && rng.gen_bool(0.6) {
                return self.rollback_to(rng);
            }
            return Step {
                sql: format!("SELECT {c}::int4"),
                res: Res::ParseErr("25P02"),
            };
        }
        let n = m.tick();
        match rng.gen_range(0..100) {
            0..=34 => {
                let k = rng.gen_range(0..self.cur.len());
                let d = rng.gen_range(1..1000i64);
                self.cur[k] += d;
                Step {
                    sql: format!(
                        "UPDATE public.diff_rows SET v = v + {d} WHERE client = {c} AND k = {k} RETURNING v"
                    ),
                    res: Res::Rows(1, vec![vec![self.cur[k].to_string()]], "UPDATE 1".into()),
                }
            }
            35..=49 => Step {
                sql: format!(
                    "SELECT string_agg(v::text, ',' ORDER BY k) FROM public.diff_rows WHERE client = {c}"
                ),
                res: Res::Rows(1, vec![vec![rows_text(&self.cur)]], "SELECT 1".into()),
            },
            50..=61 => {
                let name = format!("sp{}", self.saves.len());
                self.saves.push((name.clone(), self.cur.clone()));
                Step { sql: format!("SAVEPOINT {name}"), res: tag("SAVEPOINT") }
            }
            62..=69 if !self.saves.is_empty() => self.rollback_to(rng),
            70..=74 if !self.saves.is_empty() => {
                let i = rng.gen_range(0..self.saves.len());
                let name = self.saves[i].0.clone();
                self.saves.truncate(i);
                Step { sql: format!("RELEASE SAVEPOINT {name}"), res: tag("RELEASE") }
            }
            75..=82 => {
                self.aborted = true;
                Step { sql: DIV0.into(), res: Res::Err("22012") }
            }
            83..=87 => Step {
                sql: format!("DO $$BEGIN RAISE NOTICE 'tx c{c} n{n}'; END$$"),
                res: Res::Notices(vec![format!("tx c{c} n{n}")], "DO".into()),
            },
            88..=92 => {
                let name = UNTRACKED[rng.gen_range(0..UNTRACKED.len())];
                let v = if name == "work_mem" { "'8MB'" } else { "off" };
                Step { sql: format!("SET LOCAL {name} = {v}"), res: tag("SET") }
            }
            _ => Step {
                sql: format!("SELECT {c}::int4, {n}::int8"),
                res: Res::Rows(2, vec![vec![c.to_string(), n.to_string()]], "SELECT 1".into()),
            },
        }
    }

    fn rollback_to(&mut self, rng: &mut StdRng) -> Step {
        let i = rng.gen_range(0..self.saves.len());
        let (name, state) = self.saves[i].clone();
        self.saves.truncate(i + 1);
        self.cur = state;
        self.aborted = false;
        Step {
            sql: format!("ROLLBACK TO SAVEPOINT {name}"),
            res: tag("ROLLBACK"),
        }
    }
}

/// How a group of statements goes on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Grouping {
    /// One Query string; an error skips the rest of it.
    SimpleMulti,
    /// One Query per statement, all in one write.
    SimpleEach,
    /// Parse/Bind/Execute per statement, one Sync; an error skips to the Sync.
    ExtOneSync,
    /// Parse/Bind/Execute/Sync per statement, all in one write.
    ExtEachSync,
}

fn emit(s: &mut Script, g: Grouping, steps: &[(Step, u8)]) {
    let simple = matches!(g, Grouping::SimpleMulti | Grouping::SimpleEach);
    match g {
        Grouping::SimpleMulti => {
            let sql: Vec<&str> = steps.iter().map(|(st, _)| st.sql.as_str()).collect();
            s.out().query(&sql.join("; "));
        }
        Grouping::SimpleEach => steps.iter().for_each(|(st, _)| s.out().query(&st.sql)),
        Grouping::ExtOneSync | Grouping::ExtEachSync => {
            for (st, _) in steps {
                let o = s.out();
                o.parse("", &st.sql);
                o.bind("", "", &[]);
                o.execute("", 0);
                if g == Grouping::ExtEachSync {
                    o.sync();
                }
            }
            if g == Grouping::ExtOneSync {
                s.out().sync();
            }
        }
    }
    let each = matches!(g, Grouping::SimpleEach | Grouping::ExtEachSync);
    let mut exps = Vec::new();
    for (st, status) in steps {
        exps.extend(st.exps(simple));
        if each {
            exps.push(Exp::Ready(*status));
        }
    }
    if !each {
        exps.push(Exp::Ready(steps.last().unwrap().1));
    }
    for e in exps {
        s.exp(e);
    }
}

/// BEGIN, a random walk of statements, COMMIT or ROLLBACK; sent in random groupings.
pub fn transaction(m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("transaction");
    let mut tx = Tx {
        c: m.cid,
        cur: m.rows.clone(),
        saves: Vec::new(),
        aborted: false,
        done: false,
        committed: false,
    };
    let begin = if rng.gen_bool(0.2) {
        "BEGIN ISOLATION LEVEL REPEATABLE READ"
    } else {
        "BEGIN"
    };
    let mut pending = vec![(
        Step {
            sql: begin.into(),
            res: tag("BEGIN"),
        },
        b'T',
    )];
    let mut budget = rng.gen_range(2..8);
    while !tx.done {
        let g = match rng.gen_range(0..4) {
            0 => Grouping::SimpleMulti,
            1 => Grouping::SimpleEach,
            2 => Grouping::ExtOneSync,
            _ => Grouping::ExtEachSync,
        };
        // An error ends a group that would skip the rest of it, so the model never has to
        // guess which statements were skipped.
        let skips = matches!(g, Grouping::SimpleMulti | Grouping::ExtOneSync);
        let first = !pending.is_empty();
        let mut group: Vec<(Step, u8)> = std::mem::take(&mut pending);
        // BEGIN goes alone when each statement is its own batch: were it refused, the
        // batches after it in the same write would run outside any transaction.
        let size = if first && !skips {
            1
        } else {
            rng.gen_range(1..=3)
        };
        while group.len() < size && !tx.done {
            if group.last().is_some_and(|(st, _)| skips && st.fails()) {
                break;
            }
            let st = if budget == 0 {
                tx.end(rng)
            } else {
                budget -= 1;
                tx.next(m, rng)
            };
            group.push((st, tx.status()));
        }
        if group.is_empty() {
            break;
        }
        let commits = group.iter().any(|(st, _)| st.sql == "COMMIT") && tx.committed;
        emit(&mut s, g, &group);
        if commits {
            mark_last_send_commit(&mut s);
        }
    }
    let mut p = Plan::new(s);
    if tx.committed {
        p.rows_after = Some(tx.cur);
    }
    p
}

/// Marks the most recent write as the commit point (the expectations follow it).
fn mark_last_send_commit(s: &mut Script) {
    if let Some(Item::Send { commit, .. }) = s
        .items
        .iter_mut()
        .rev()
        .find(|i| matches!(i, Item::Send { .. }))
    {
        *commit = true;
    }
}

/// A long query cancelled by CancelRequest after a random delay; either answer is right
/// (the cancel may arrive after the end, or while the query waits in the proxy's queue).
pub fn cancel(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let mut s = Script::new("cancel");
    s.allow = &["57014"];
    s.extra = Duration::from_millis(1500);
    let in_tx = rng.gen_bool(0.3);
    if in_tx {
        s.out().query("BEGIN");
        s.exp(Exp::Complete("BEGIN".into()));
        s.exp(Exp::Ready(b'T'));
    }
    s.out()
        .query(&format!("SELECT pg_sleep(1.5), {c}::int4, {n}::int8"));
    s.push(Item::Cancel(Duration::from_millis(rng.gen_range(20..2000))));
    s.select1(&["", &c.to_string(), &n.to_string()]);
    if in_tx {
        s.exp(Exp::Ready(b'T'));
        s.out().query("ROLLBACK");
        s.exp(Exp::Complete("ROLLBACK".into()));
    }
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// Starts work and drops the socket: mid-query, inside a transaction holding a row lock, or
/// mid-COPY (inside a transaction or not). Nothing of it may persist.
pub fn kill(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let mut s = Script::new("kill");
    s.pure = false;
    let mut copy = None;
    match rng.gen_range(0..5) {
        0 => {
            s.out().query("SELECT pg_sleep(3)");
        }
        1 => {
            s.out().query("SELECT pg_sleep(0.2)");
            s.push(Item::Kill);
            return Plan::new(s);
        }
        2 => {
            let k = rng.gen_range(0..m.rows.len());
            s.out().query(&format!(
                "BEGIN; UPDATE public.diff_rows SET v = -1 WHERE client = {c} AND k = {k}"
            ));
            s.exp(Exp::Complete("BEGIN".into()));
            s.exp(Exp::Complete("UPDATE 1".into()));
            s.exp(Exp::Ready(b'T'));
            if rng.gen_bool(0.5) {
                s.out().query("SELECT pg_sleep(3)");
            }
        }
        n => {
            let b = m.next_batch;
            m.next_batch += 1;
            if n == 4 {
                s.out().query("BEGIN");
                s.exp(Exp::Complete("BEGIN".into()));
                s.exp(Exp::Ready(b'T'));
            }
            s.out()
                .query("COPY public.diff_copy(client, batch, n) FROM STDIN");
            s.exp(Exp::CopyIn);
            s.out()
                .copy_data(format!("{c}\t{b}\t1\n{c}\t{b}\t2\n").as_bytes());
            copy = Some((
                b,
                Batch {
                    rows: 0,
                    sum: 0,
                    certain: true,
                },
            ));
        }
    }
    s.push(Item::Pause(Duration::from_millis(rng.gen_range(10..300))));
    s.push(Item::Kill);
    let mut p = Plan::new(s);
    p.copy = copy;
    p
}
