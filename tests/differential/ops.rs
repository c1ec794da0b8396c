//! Operations on the simple and extended protocol, prepared statements, session parameters
//! and notices. Every value a query returns carries the client's id and a counter, so an
//! answer that belongs to another client, or to an earlier request, cannot match.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::model::{set_literal, Model, Plan, PARAMS, UNTRACKED};
use super::script::{text_row, Exp, Script};
use super::wire::Out;

/// A runtime division by zero (22012): volatile, so the planner cannot fold it and the error
/// comes from Execute, not from Parse or Bind.
pub const DIV0: &str = "SELECT 1 / (random() < 0)::int";

pub fn select(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let mut s = Script::new("select");
    let body = format!("SELECT {c}::int4 AS c, {n}::int8 AS n, 'c{c}n{n}' AS t");
    // A leading comment must not hide the statement from anything that scans it.
    let sql = if rng.gen_bool(0.3) {
        format!("/* c{c} */ {body}")
    } else {
        body
    };
    s.out().query(&sql);
    s.select1(&[&c.to_string(), &n.to_string(), &format!("c{c}n{n}")]);
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// Several statements in one Query, with an empty one between; sometimes an error midway,
/// which ends the string there.
pub fn multi(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let mut s = Script::new("multi");
    if rng.gen_bool(0.3) {
        s.out()
            .query(&format!("SELECT {c}::int4; {DIV0}; SELECT {n}::int8"));
        s.select1(&[&c.to_string()]);
        s.exp(Exp::RowDesc(1));
        s.exp(Exp::Error("22012"));
    } else {
        s.out().query(&format!(
            "SELECT {c}::int4; ; SELECT {n}::int8 * 2, 'x{c}'; SELECT 1 WHERE false; \
             UPDATE public.diff_rows SET v = v WHERE client = {c} AND k = 0"
        ));
        s.select1(&[&c.to_string()]);
        s.select1(&[&(n * 2).to_string(), &format!("x{c}")]);
        s.exp(Exp::RowDesc(1));
        s.exp(Exp::Complete("SELECT 0".into()));
        s.exp(Exp::Complete("UPDATE 1".into()));
    }
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

pub fn empty(_m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("empty");
    match rng.gen_range(0..3) {
        0 => s.out().query(""),
        1 => s.out().query(" ; "),
        _ => {
            let o = s.out();
            o.parse("", "");
            o.bind("", "", &[]);
            o.execute("", 0);
            o.sync();
            s.exp(Exp::ParseComplete);
            s.exp(Exp::BindComplete);
        }
    }
    s.exp(Exp::EmptyQuery);
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// The unnamed statement and portal, with Describe of either, NULL parameters.
pub fn extended(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let mut s = Script::new("extended");
    let t = format!("e{c}.{n}");
    let null = rng.gen_bool(0.2);
    let (desc_s, desc_p) = (rng.gen_bool(0.3), rng.gen_bool(0.5));
    let (cs, ns) = (c.to_string(), n.to_string());
    let o = s.out();
    o.parse("", "SELECT $1::int4 AS c, $2::int8 AS n, $3::text AS t");
    if desc_s {
        o.describe(b'S', "");
    }
    let third = if null { None } else { Some(t.as_bytes()) };
    o.bind("", "", &[Some(cs.as_bytes()), Some(ns.as_bytes()), third]);
    if desc_p {
        o.describe(b'P', "");
    }
    o.execute("", 0);
    o.sync();
    s.exp(Exp::ParseComplete);
    if desc_s {
        s.exp(Exp::ParamDesc(3));
        s.exp(Exp::RowDesc(3));
    }
    s.exp(Exp::BindComplete);
    if desc_p {
        s.exp(Exp::RowDesc(3));
    }
    let mut row = text_row(&[&cs, &ns, &t]);
    if null {
        row[2] = None;
    }
    s.exp(Exp::Row(row));
    s.exp(Exp::Complete("SELECT 1".into()));
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// A portal fetched in two Executes: rows, PortalSuspended, the rest.
pub fn portal(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let total = rng.gen_range(3..12);
    let first = rng.gen_range(1..total);
    let name = if rng.gen_bool(0.5) { "" } else { "cur" };
    let mut s = Script::new("portal");
    let o = s.out();
    o.parse(
        "",
        &format!("SELECT g, {c}::int4 FROM generate_series(1, {total}) g"),
    );
    o.bind(name, "", &[]);
    o.execute(name, first);
    o.execute(name, 0);
    o.sync();
    s.exp(Exp::ParseComplete);
    s.exp(Exp::BindComplete);
    for g in 1..=total {
        s.exp(Exp::Row(text_row(&[&g.to_string(), &c.to_string()])));
        if g == first {
            s.exp(Exp::PortalSuspended);
        }
    }
    s.exp(Exp::Complete(format!("SELECT {}", total - first)));
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// One statement of an extended-protocol batch.
#[derive(Clone, Copy)]
enum St {
    Select,
    Named,
    Update,
    ErrExecute,
    ErrParse,
}

/// Appends one statement; returns its answers and whether it fails (ending the batch).
fn ext_stmt(
    m: &mut Model,
    rng: &mut StdRng,
    st: St,
    o: &mut Out,
    rows: &mut [i64],
) -> (Vec<Exp>, bool) {
    let c = m.cid;
    let n = m.tick();
    let ns = n.to_string();
    match st {
        St::Named if !m.stmts.is_empty() => {
            let names: Vec<String> = m.stmts.keys().cloned().collect();
            let name = names.choose(rng).unwrap().clone();
            let ver = m.stmts[&name];
            o.bind("", &name, &[Some(ns.as_bytes())]);
            o.execute("", 0);
            let row = text_row(&[&c.to_string(), &ver.to_string(), &ns]);
            (
                vec![
                    Exp::BindComplete,
                    Exp::Row(row),
                    Exp::Complete("SELECT 1".into()),
                ],
                false,
            )
        }
        St::Select | St::Named => {
            o.parse("", &format!("SELECT $1::int8, {c}::int4"));
            o.bind("", "", &[Some(ns.as_bytes())]);
            o.execute("", 0);
            let row = text_row(&[&ns, &c.to_string()]);
            (
                vec![
                    Exp::ParseComplete,
                    Exp::BindComplete,
                    Exp::Row(row),
                    Exp::Complete("SELECT 1".into()),
                ],
                false,
            )
        }
        St::Update => {
            let k = rng.gen_range(0..rows.len());
            let v = (c as i64) * 1_000_000_000 + n as i64;
            o.parse(
                "",
                &format!(
                    "UPDATE public.diff_rows SET v = $1 WHERE client = {c} AND k = {k} RETURNING v"
                ),
            );
            o.bind("", "", &[Some(v.to_string().as_bytes())]);
            o.execute("", 0);
            rows[k] = v;
            let row = text_row(&[&v.to_string()]);
            (
                vec![
                    Exp::ParseComplete,
                    Exp::BindComplete,
                    Exp::Row(row),
                    Exp::Complete("UPDATE 1".into()),
                ],
                false,
            )
        }
        St::ErrExecute => {
            o.parse("", DIV0);
            o.bind("", "", &[]);
            o.execute("", 0);
            (
                vec![Exp::ParseComplete, Exp::BindComplete, Exp::Error("22012")],
                true,
            )
        }
        St::ErrParse => {
            o.parse("", "SELECT * FROM public.diff_no_such_table");
            o.bind("", "", &[]);
            o.execute("", 0);
            (vec![Exp::Error("42P01")], true)
        }
    }
}

fn random_st(rng: &mut StdRng, allow_update: bool, allow_error: bool) -> St {
    match rng.gen_range(0..10) {
        0..=3 => St::Select,
        4..=5 => St::Named,
        6..=7 if allow_update => St::Update,
        8 if allow_error => St::ErrExecute,
        9 if allow_error => St::ErrParse,
        _ => St::Select,
    }
}

/// Appends a batch of statements up to one Sync. In its implicit transaction an error undoes
/// the statements before it; the rest are skipped.
fn ext_batch(
    m: &mut Model,
    rng: &mut StdRng,
    sts: &[St],
    s: &mut Script,
    exps: &mut Vec<Exp>,
) -> Option<Vec<i64>> {
    let mut rows = m.rows.clone();
    let mut failed = false;
    let mut wrote = false;
    for &st in sts {
        let (e, err) = ext_stmt(m, rng, st, s.out(), &mut rows);
        wrote |= matches!(st, St::Update);
        if !failed {
            exps.extend(e);
        }
        failed |= err;
    }
    s.out().sync();
    exps.push(Exp::Ready(b'I'));
    if wrote && !failed {
        s.commit_point();
        return Some(rows);
    }
    None
}

/// Several Parse/Bind/Execute before one Sync.
pub fn pipeline(m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("pipeline");
    let count = rng.gen_range(2..=5);
    let mut wrote = false;
    let sts: Vec<St> = (0..count)
        .map(|_| {
            let err = rng.gen_bool(0.3);
            let st = random_st(rng, !wrote && m.alts.is_empty(), err);
            wrote |= matches!(st, St::Update);
            st
        })
        .collect();
    let mut exps = Vec::new();
    let rows_after = ext_batch(m, rng, &sts, &mut s, &mut exps);
    for e in exps {
        s.exp(e);
    }
    let mut p = Plan::new(s);
    p.rows_after = rows_after;
    p
}

/// Several batches, each with its own Sync, in one write; each answered on its own.
pub fn syncs(m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("syncs");
    let groups = rng.gen_range(2..=4);
    let writer = if m.alts.is_empty() {
        rng.gen_range(0..groups + 1)
    } else {
        groups
    };
    let mut exps = Vec::new();
    let mut rows_after = None;
    for g in 0..groups {
        let err = rng.gen_bool(0.25);
        let mut sts = vec![random_st(rng, false, err)];
        if g == writer {
            sts.push(St::Update);
        }
        if rng.gen_bool(0.4) {
            sts.push(random_st(rng, false, false));
        }
        if let Some(r) = ext_batch(m, rng, &sts, &mut s, &mut exps) {
            rows_after = Some(r);
        }
    }
    for e in exps {
        s.exp(e);
    }
    let mut p = Plan::new(s);
    p.rows_after = rows_after;
    p
}

/// Part of a batch with Flush, its answers read, then the rest and Sync.
pub fn flush(m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("flush");
    let mut rows = m.rows.clone();
    let (e, _) = ext_stmt(m, rng, St::Select, s.out(), &mut rows);
    s.out().flush();
    for x in e {
        s.exp(x);
    }
    let (e, _) = ext_stmt(m, rng, St::Named, s.out(), &mut rows);
    s.out().sync();
    for x in e {
        s.exp(x);
    }
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// The unnamed statement parsed in one batch and used in the next: a pooler must keep it
/// with this client between the two.
pub fn unnamed_split(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    // Parameter counts differ between clients, so a foreign statement also shows as an error.
    let np = 1 + (c as usize % 3);
    let cols: Vec<String> = (1..=np).map(|i| format!("${i}::text")).collect();
    let sql = format!(
        "SELECT {c}::int4 AS owner, {n}::int8 AS n, {}",
        cols.join(", ")
    );
    let mut s = Script::new("unnamed_split");
    s.out().parse("", &sql);
    s.out().sync();
    s.exp(Exp::ParseComplete);
    s.exp(Exp::Ready(b'I'));
    if rng.gen_bool(0.5) {
        s.push(super::script::Item::Pause(
            std::time::Duration::from_millis(rng.gen_range(0..5)),
        ));
    }
    if rng.gen_bool(0.25) {
        s.out().describe(b'S', "");
        s.out().sync();
        s.exp(Exp::ParamDesc(np));
        s.exp(Exp::RowDesc(2 + np));
        s.exp(Exp::Ready(b'I'));
    }
    let vals: Vec<String> = (1..=np).map(|i| format!("p{c}.{n}.{i}")).collect();
    let params: Vec<Option<&[u8]>> = vals.iter().map(|v| Some(v.as_bytes())).collect();
    s.out().bind("", "", &params);
    s.out().execute("", 0);
    s.out().sync();
    let mut row = vec![c.to_string(), n.to_string()];
    row.extend(vals.iter().cloned());
    let row: Vec<&str> = row.iter().map(String::as_str).collect();
    s.exp(Exp::BindComplete);
    s.exp(Exp::Row(text_row(&row)));
    s.exp(Exp::Complete("SELECT 1".into()));
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// NOTICEs raised in a DO block, through either protocol.
pub fn notice(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let mut s = Script::new("notice");
    let sql =
        format!("DO $$BEGIN RAISE NOTICE 'diff c{c} n{n}'; RAISE NOTICE 'diff c{c} again'; END$$");
    if rng.gen_bool(0.5) {
        s.out().query(&sql);
    } else {
        let o = s.out();
        o.parse("", &sql);
        o.bind("", "", &[]);
        o.execute("", 0);
        o.sync();
        s.exp(Exp::ParseComplete);
        s.exp(Exp::BindComplete);
    }
    s.exp(Exp::Notice(format!("diff c{c} n{n}")));
    s.exp(Exp::Notice(format!("diff c{c} again")));
    s.exp(Exp::Complete("DO".into()));
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}
