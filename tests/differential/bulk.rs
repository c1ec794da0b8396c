//! Operations that move data in bulk or take time: COPY in and out (both protocols, CopyFail,
//! inside a rolled-back transaction), rows of megabytes, pg_sleep, and the read-back of the
//! client's rows that resolves any uncertainty.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use super::model::{payload, Batch, Model, Plan};
use super::script::{text_row, Exp, Script};

/// The large row's state before its first write.
pub const NO_BIG: (i64, usize) = (0, 0);

const COPY_SQL: &str = "COPY public.diff_copy(client, batch, n) FROM STDIN";

fn copy_lines(c: u32, b: u32, rows: i64) -> Vec<u8> {
    (1..=rows)
        .flat_map(|i| format!("{c}\t{b}\t{i}\n").into_bytes())
        .collect()
}

/// Sends `data` as 1-4 CopyData messages.
fn copy_chunks(s: &mut Script, rng: &mut StdRng, data: &[u8]) {
    let parts = rng.gen_range(1..=4usize);
    let step = data.len().div_ceil(parts).max(1);
    for chunk in data.chunks(step) {
        s.out().copy_data(chunk);
    }
}

fn check_batch(s: &mut Script, c: u32, b: u32, want: Batch) {
    s.out().query(&format!(
        "SELECT count(*), coalesce(sum(n), 0) FROM public.diff_copy \
         WHERE client = {c} AND batch = {b}"
    ));
    s.select1(&[&want.rows.to_string(), &want.sum.to_string()]);
    s.exp(Exp::Ready(b'I'));
}

pub fn copy_in(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let b = m.next_batch;
    m.next_batch += 1;
    let rows = rng.gen_range(1..=400i64);
    let full = Batch {
        rows,
        sum: rows * (rows + 1) / 2,
        certain: true,
    };
    let none = Batch {
        rows: 0,
        sum: 0,
        certain: true,
    };
    let data = copy_lines(c, b, rows);
    let mut s = Script::new("copy_in");
    let kept = match rng.gen_range(0..10) {
        0..=3 => {
            s.out().query(COPY_SQL);
            s.exp(Exp::CopyIn);
            copy_chunks(&mut s, rng, &data);
            s.out().copy_done();
            s.commit_point();
            s.exp(Exp::Complete(format!("COPY {rows}")));
            s.exp(Exp::Ready(b'I'));
            full
        }
        4..=6 => {
            // As drivers send it: the Sync goes before the data, and PostgreSQL ignores it in
            // copy-in mode, so the two Syncs get one ReadyForQuery.
            let o = s.out();
            o.parse("", COPY_SQL);
            o.bind("", "", &[]);
            o.execute("", 0);
            o.sync();
            s.exp(Exp::ParseComplete);
            s.exp(Exp::BindComplete);
            s.exp(Exp::CopyIn);
            copy_chunks(&mut s, rng, &data);
            s.out().copy_done();
            s.out().sync();
            s.out().readys = 0;
            s.commit_point();
            s.exp(Exp::Complete(format!("COPY {rows}")));
            s.exp(Exp::Ready(b'I'));
            full
        }
        7..=8 => {
            s.out().query(COPY_SQL);
            s.exp(Exp::CopyIn);
            copy_chunks(&mut s, rng, &data[..data.len() / 2]);
            s.out().copy_fail("diff: client gave up");
            s.exp(Exp::Error("57014"));
            s.exp(Exp::Ready(b'I'));
            none
        }
        _ => {
            s.out().query("BEGIN");
            s.exp(Exp::Complete("BEGIN".into()));
            s.exp(Exp::Ready(b'T'));
            s.out().query(COPY_SQL);
            s.exp(Exp::CopyIn);
            copy_chunks(&mut s, rng, &data);
            s.out().copy_done();
            s.exp(Exp::Complete(format!("COPY {rows}")));
            s.exp(Exp::Ready(b'T'));
            s.out().query("ROLLBACK");
            s.exp(Exp::Complete("ROLLBACK".into()));
            s.exp(Exp::Ready(b'I'));
            none
        }
    };
    check_batch(&mut s, c, b, kept);
    let mut p = Plan::new(s);
    p.copy = Some((b, kept));
    p
}

pub fn copy_out(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let mut s = Script::new("copy_out");
    let (sql, lines): (String, Vec<String>) = if m.alts.is_empty() && rng.gen_bool(0.3) {
        let lines = m
            .rows
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{k}\t{v}\n"))
            .collect();
        (
            format!(
                "COPY (SELECT k, v FROM public.diff_rows WHERE client = {c} ORDER BY k) TO STDOUT"
            ),
            lines,
        )
    } else {
        let n = rng.gen_range(1..=1500);
        let lines = (1..=n).map(|g| format!("{c}\t{g}\n")).collect();
        (
            format!("COPY (SELECT {c}, g FROM generate_series(1, {n}) g) TO STDOUT"),
            lines,
        )
    };
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
    s.exp(Exp::CopyOut);
    let n = lines.len();
    for l in lines {
        s.exp(Exp::CopyData(l.into_bytes()));
    }
    s.exp(Exp::CopyDone);
    s.exp(Exp::Complete(format!("COPY {n}")));
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// A row of up to a few MB written as a Bind parameter and read back; or a large value
/// computed by the server.
pub fn big(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let mut s = Script::new("big");
    let len = if rng.gen_bool(0.7) {
        rng.gen_range(64 * 1024..512 * 1024)
    } else {
        rng.gen_range(512 * 1024..3 * 1024 * 1024)
    };
    let read = format!("SELECT seq, payload FROM public.diff_big WHERE client = {c}");
    match rng.gen_range(0..10) {
        0..=5 => {
            m.big_seq += 1;
            let seq = m.big_seq;
            let data = payload(c, seq, len);
            let (cs, ss) = (c.to_string(), seq.to_string());
            let o = s.out();
            o.parse(
                "",
                "INSERT INTO public.diff_big(client, seq, payload) VALUES ($1, $2, $3) \
                 ON CONFLICT (client) DO UPDATE SET seq = EXCLUDED.seq, payload = EXCLUDED.payload",
            );
            o.bind(
                "",
                "",
                &[Some(cs.as_bytes()), Some(ss.as_bytes()), Some(&data)],
            );
            o.execute("", 0);
            o.sync();
            s.commit_point();
            s.exp(Exp::ParseComplete);
            s.exp(Exp::BindComplete);
            s.exp(Exp::Complete("INSERT 0 1".into()));
            s.exp(Exp::Ready(b'I'));
            s.out().query(&read);
            s.exp(Exp::RowDesc(2));
            s.exp(Exp::Row(vec![Some(ss.into_bytes()), Some(data)]));
            s.exp(Exp::Complete("SELECT 1".into()));
            s.exp(Exp::Ready(b'I'));
            let mut p = Plan::new(s);
            p.big_after = Some((seq, len));
            p
        }
        6..=7 if !m.big.is_empty() && !m.big.contains(&NO_BIG) => {
            s.out().query(&read);
            s.exp(Exp::RowDesc(2));
            let rows = m
                .big
                .iter()
                .map(|&(seq, len)| {
                    vec![
                        Some(seq.to_string().into_bytes()),
                        Some(payload(c, seq, len)),
                    ]
                })
                .collect();
            s.exp(Exp::RowOneOf(rows));
            s.exp(Exp::Complete("SELECT 1".into()));
            s.exp(Exp::Ready(b'I'));
            let mut p = Plan::new(s);
            p.resolves_big = true;
            p
        }
        _ => {
            let reps = len / 8;
            let unit = format!("c{c:06}.");
            s.out()
                .query(&format!("SELECT repeat('{unit}', {reps}), {c}::int4"));
            let val = unit.repeat(reps);
            s.select1(&[&val, &c.to_string()]);
            s.exp(Exp::Ready(b'I'));
            Plan::new(s)
        }
    }
}

/// A query that takes a while (holds its slot and server connection).
pub fn sleep(m: &mut Model, rng: &mut StdRng) -> Plan {
    let (c, n) = (m.cid, m.tick());
    let ms = rng.gen_range(20..600u64);
    let mut s = Script::new("sleep");
    s.extra = Duration::from_millis(ms);
    s.out().query(&format!(
        "SELECT pg_sleep({ms} / 1000.0), {c}::int4, {n}::int8"
    ));
    s.select1(&["", &c.to_string(), &n.to_string()]);
    s.exp(Exp::Ready(b'I'));
    Plan::new(s)
}

/// Reads the client's rows back; they must be in one of the states the model allows.
pub fn verify(m: &mut Model, rng: &mut StdRng) -> Plan {
    let c = m.cid;
    let sql = format!(
        "SELECT string_agg(v::text, ',' ORDER BY k) FROM public.diff_rows WHERE client = {c}"
    );
    let mut s = Script::new("verify");
    if rng.gen_bool(0.5) {
        s.out().query(&sql);
        s.exp(Exp::RowDesc(1));
    } else {
        let o = s.out();
        o.parse("", &sql);
        o.bind("", "", &[]);
        o.execute("", 0);
        o.sync();
        s.exp(Exp::ParseComplete);
        s.exp(Exp::BindComplete);
    }
    let states = m
        .row_states()
        .into_iter()
        .map(|t| text_row(&[&t]))
        .collect();
    s.exp(Exp::RowOneOf(states));
    s.exp(Exp::Complete("SELECT 1".into()));
    s.exp(Exp::Ready(b'I'));
    let mut p = Plan::new(s);
    p.resolves_rows = true;
    p
}
