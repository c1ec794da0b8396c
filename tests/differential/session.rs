//! Session state: named prepared statements (prepare, run, re-prepare, Close, duplicate
//! Parse, DEALLOCATE, DISCARD ALL) and session parameters (SET, set_config, RESET, inside
//! transactions, SET LOCAL), each read back with SHOW and, where visible, by its effect.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::model::{set_literal, Model, Plan, PARAMS, UNTRACKED};
use super::script::{text_row, Exp, Script};
use super::wire::Out;

fn named_sql(c: u32, ver: u32) -> String {
    format!("SELECT {c}::int4 AS owner, {ver}::int4 AS ver, $1::int8 AS arg")
}

fn exec_named(o: &mut Out, c: u32, name: &str, ver: u32, n: u64) -> Vec<Exp> {
    let ns = n.to_string();
    o.bind("", name, &[Some(ns.as_bytes())]);
    o.execute("", 0);
    vec![
        Exp::BindComplete,
        Exp::Row(text_row(&[&c.to_string(), &ver.to_string(), &ns])),
        Exp::Complete("SELECT 1".into()),
    ]
}

/// Named statements (the same few names in every client): prepare, run, re-prepare, close,
/// duplicate Parse, DEALLOCATE, DISCARD ALL.
pub fn named(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let mut s = Script::new("named");
    s.pure = false;
    let mut stmts = m.stmts.clone();
    let mut params = m.params.clone();
    let existing: Vec<String> = stmts.keys().cloned().collect();
    let free: Vec<String> = (0..4)
        .map(|i| format!("s{i}"))
        .filter(|n| !stmts.contains_key(n))
        .collect();
    let pick = rng.gen_range(0..100);
    let some = existing.choose(rng).cloned();
    match (pick, some) {
        (0..=29, _) | (_, None) if !free.is_empty() => {
            let name = free.choose(rng).unwrap().clone();
            let ver = m.tick() as u32;
            s.out().parse(&name, &named_sql(c, ver));
            if rng.gen_bool(0.5) {
                s.out().describe(b'S', &name);
                s.out().sync();
                s.exp(Exp::ParseComplete);
                s.exp(Exp::ParamDesc(1));
                s.exp(Exp::RowDesc(3));
            } else {
                s.out().sync();
                s.exp(Exp::ParseComplete);
            }
            s.exp(Exp::Ready(b'I'));
            stmts.insert(name, ver);
        }
        (0..=54, Some(name)) => {
            let n = m.tick();
            let mut exps = exec_named(s.out(), c, &name, stmts[&name], n);
            if let Some(other) = existing.choose(rng) {
                let n = m.tick();
                exps.extend(exec_named(s.out(), c, other, stmts[other], n));
            }
            s.out().sync();
            exps.push(Exp::Ready(b'I'));
            exps.into_iter().for_each(|e| s.exp(e));
        }
        (55..=64, Some(name)) => {
            let ver = m.tick() as u32;
            s.out().close(b'S', &name);
            s.out().parse(&name, &named_sql(c, ver));
            let n = m.tick();
            let mut exps = vec![Exp::CloseComplete, Exp::ParseComplete];
            exps.extend(exec_named(s.out(), c, &name, ver, n));
            s.out().sync();
            exps.push(Exp::Ready(b'I'));
            exps.into_iter().for_each(|e| s.exp(e));
            stmts.insert(name, ver);
        }
        (65..=69, Some(name)) => {
            s.out().parse(&name, &named_sql(c, 0));
            s.out().sync();
            s.exp(Exp::Error("42P05"));
            s.exp(Exp::Ready(b'I'));
        }
        (70..=77, Some(name)) => {
            s.out().close(b'S', &name);
            s.out().sync();
            s.exp(Exp::CloseComplete);
            s.exp(Exp::Ready(b'I'));
            s.out().bind("", &name, &[Some(b"1")]);
            s.out().execute("", 0);
            s.out().sync();
            s.exp(Exp::Error("26000"));
            s.exp(Exp::Ready(b'I'));
            stmts.remove(&name);
        }
        (78..=85, Some(name)) => {
            s.out().query(&format!("DEALLOCATE {name}"));
            s.exp(Exp::Complete("DEALLOCATE".into()));
            s.exp(Exp::Ready(b'I'));
            stmts.remove(&name);
        }
        (86..=90, _) => {
            s.out().query("DEALLOCATE ALL");
            s.exp(Exp::Complete("DEALLOCATE ALL".into()));
            s.exp(Exp::Ready(b'I'));
            stmts.clear();
        }
        (91..=95, _) => {
            s.out().query("DISCARD ALL");
            s.exp(Exp::Complete("DISCARD ALL".into()));
            s.exp(Exp::Ready(b'I'));
            stmts.clear();
            params.clear();
        }
        _ => {
            // A name this client never prepared (another client may well have).
            let name = free.first().cloned().unwrap_or_else(|| "s9".into());
            s.out().bind("", &name, &[Some(b"1")]);
            s.out().execute("", 0);
            s.out().sync();
            s.exp(Exp::Error("26000"));
            s.exp(Exp::Ready(b'I'));
        }
    }
    let mut p = Plan::new(s);
    p.session_after = Some((stmts, params));
    p
}

/// What a query shows of a setting's effect, where the value alone decides it.
fn effect(name: &str, value: &str) -> Option<(&'static str, String)> {
    let v = match (name, value) {
        ("bytea_output", "hex") => "\\x4142",
        ("bytea_output", "escape") => "AB",
        ("DateStyle", "ISO, MDY" | "ISO, DMY") => "2001-02-03",
        ("DateStyle", "SQL, DMY") => "03/02/2001",
        ("DateStyle", "Postgres, MDY") => "02-03-2001",
        ("DateStyle", "German, DMY") => "03.02.2001",
        ("TimeZone", "UTC" | "Etc/UTC" | "GMT") => "04",
        ("TimeZone", "Europe/Berlin") => "05",
        ("TimeZone", "America/New_York") => "23",
        ("TimeZone", "Asia/Tokyo") => "13",
        _ => return None,
    };
    let sql = match name {
        "bytea_output" => "SELECT 'AB'::bytea",
        "DateStyle" => "SELECT DATE '2001-02-03'",
        _ => "SELECT to_char(TIMESTAMPTZ '2001-02-03 04:05:06+00', 'HH24')",
    };
    Some((sql, v.to_string()))
}

/// SHOW of `names` (and the visible effect of each where known) in one Query.
pub fn show_checks(
    s: &mut Script,
    m: &Model,
    params: &BTreeMap<&'static str, String>,
    names: &[&'static str],
) {
    let mut sql = Vec::new();
    let mut exps = Vec::new();
    for &name in names {
        let v = params
            .get(name)
            .cloned()
            .unwrap_or_else(|| m.reset_value(name));
        sql.push(format!("SHOW {name}"));
        exps.extend([
            Exp::RowDesc(1),
            Exp::Row(text_row(&[&v])),
            Exp::Complete("SHOW".into()),
        ]);
        if let Some((q, shown)) = effect(name, &v) {
            sql.push(q.to_string());
            exps.extend([
                Exp::RowDesc(1),
                Exp::Row(text_row(&[&shown])),
                Exp::Complete("SELECT 1".into()),
            ]);
        }
    }
    s.out().query(&sql.join("; "));
    for e in exps {
        s.exp(e);
    }
    s.exp(Exp::Ready(b'I'));
}

/// SET, set_config, RESET (of the same, of an untracked setting, ALL), SET inside a
/// transaction that commits or rolls back, SET LOCAL; then SHOW reads them back.
pub fn params(m: &mut Model, rng: &mut StdRng) -> Plan {
    let mut s = Script::new("params");
    s.pure = false;
    let name = PARAMS.choose(rng).unwrap().0;
    let value = m.random_value(rng, name);
    let lit = set_literal(name, &value);
    let mut after = m.params.clone();
    match rng.gen_range(0..100) {
        0..=29 => {
            let sql = format!("SET {name} = {lit}");
            if rng.gen_bool(0.3) {
                let o = s.out();
                o.parse("", &sql);
                o.bind("", "", &[]);
                o.execute("", 0);
                o.sync();
                s.exp(Exp::ParseComplete);
                s.exp(Exp::BindComplete);
            } else {
                s.out().query(&sql);
            }
            s.exp(Exp::Complete("SET".into()));
            s.exp(Exp::Ready(b'I'));
            after.insert(name, value);
        }
        30..=39 => {
            let q = value.replace('\'', "''");
            s.out()
                .query(&format!("SELECT set_config('{name}', '{q}', false)"));
            s.select1(&[&value]);
            s.exp(Exp::Ready(b'I'));
            after.insert(name, value);
        }
        40..=54 => {
            s.out().query(&format!("RESET {name}"));
            s.exp(Exp::Complete("RESET".into()));
            s.exp(Exp::Ready(b'I'));
            after.remove(name);
        }
        55..=69 => {
            let other = UNTRACKED.choose(rng).unwrap();
            s.out().query(&format!("RESET {other}"));
            s.exp(Exp::Complete("RESET".into()));
            s.exp(Exp::Ready(b'I'));
        }
        70..=74 => {
            s.out().query("RESET ALL");
            s.exp(Exp::Complete("RESET".into()));
            s.exp(Exp::Ready(b'I'));
            after.clear();
        }
        75..=89 => {
            // Three batches, so a transaction-mode proxy sees SET inside an open transaction.
            let commit = rng.gen_bool(0.5);
            for (sql, tag, st) in [
                ("BEGIN".to_string(), "BEGIN", b'T'),
                (format!("SET {name} = {lit}"), "SET", b'T'),
            ] {
                s.out().query(&sql);
                s.exp(Exp::Complete(tag.into()));
                s.exp(Exp::Ready(st));
            }
            let end = if commit { "COMMIT" } else { "ROLLBACK" };
            s.out().query(end);
            s.exp(Exp::Complete(end.into()));
            s.exp(Exp::Ready(b'I'));
            if commit {
                after.insert(name, value);
            }
        }
        _ => {
            s.out().query(&format!(
                "BEGIN; SET LOCAL {name} = {lit}; SHOW {name}; COMMIT"
            ));
            s.exp(Exp::Complete("BEGIN".into()));
            s.exp(Exp::Complete("SET".into()));
            s.exp(Exp::RowDesc(1));
            s.exp(Exp::Row(text_row(&[&value])));
            s.exp(Exp::Complete("SHOW".into()));
            s.exp(Exp::Complete("COMMIT".into()));
            s.exp(Exp::Ready(b'I'));
        }
    }
    let other = PARAMS.choose(rng).unwrap().0;
    let names: Vec<&'static str> = if other == name {
        vec![name]
    } else {
        vec![name, other]
    };
    show_checks(&mut s, m, &after, &names);
    let mut p = Plan::new(s);
    p.session_after = Some((m.stmts.clone(), after));
    p
}
