//! Unit tests of `prepared`: the rewriting and the response bookkeeping.

use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    put_msg(&mut v, tag, &[body]);
    v
}

#[test]
fn parse_then_bind_elsewhere_injects_and_strips() {
    let mut c = ClientStatements::new(7);
    let mut s1 = ServerStatements::default();
    let mut e1 = Expectations::default();
    let parse = msg(b'P', b"s1\0SELECT 1\0\0\0");
    let mut out = Vec::new();
    assert!(rewrite(&parse, &mut c, &mut s1, &mut e1, 10, &mut out));
    assert!(out.windows(8).any(|w| w == b"pgsl_7_1"));
    assert_eq!(e1.on_complete(b'1', &mut c), Verdict::Keep);
    // A second server has never seen the statement: Bind gets a Close and a Parse in
    // front of it, both answers removed.
    let mut s2 = ServerStatements::default();
    let mut e2 = Expectations::default();
    let bind = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
    out.clear();
    assert!(rewrite(&bind, &mut c, &mut s2, &mut e2, 10, &mut out));
    let close = msg(b'C', b"Spgsl_7_1\0");
    assert_eq!(&out[..close.len()], &close[..]);
    assert_eq!(out[close.len()], b'P');
    assert!(s2.contains("pgsl_7_1"));
    assert_eq!(e2.on_complete(b'3', &mut c), Verdict::Strip);
    assert_eq!(e2.on_complete(b'1', &mut c), Verdict::Strip);
    // Same server again: no injection.
    let mut e3 = Expectations::default();
    out.clear();
    assert!(rewrite(&bind, &mut c, &mut s2, &mut e3, 10, &mut out));
    assert_eq!(out[0], b'B');
    assert!(e3.is_empty());
}

#[test]
fn eviction_closes_oldest_and_error_forgets_failed_parse() {
    let mut c = ClientStatements::new(1);
    let mut s = ServerStatements::default();
    let mut e = Expectations::default();
    for i in 0..3 {
        let p = msg(b'P', format!("s{i}\0SELECT {i}\0\0\0").as_bytes());
        let _ = rewrite(&p, &mut c, &mut s, &mut e, 2, &mut Vec::new());
    }
    assert_eq!(s.len(), 2);
    assert!(!s.contains("pgsl_1_1"));
    let mut e = Expectations::default();
    let p = msg(b'P', b"bad\0SELEC\0\0\0");
    let _ = rewrite(&p, &mut c, &mut s, &mut e, 10, &mut Vec::new());
    let _ = rewrite(&msg(b'S', b""), &mut c, &mut s, &mut e, 10, &mut Vec::new());
    e.on_error(&mut s, &mut c);
    assert!(!s.contains("pgsl_1_4"));
    e.on_ready(b'I', &mut c);
    assert!(e.is_empty());
}

/// A batch that fails part-way: the server skips every Parse and Close after the
/// failure, so none of them may change what the proxy believes is prepared.
#[test]
fn error_skips_every_later_parse_and_close() {
    let mut c = ClientStatements::new(3);
    let mut old = ServerStatements::default();
    for name in ["a", "b", "c"] {
        let p = msg(b'P', format!("{name}\0SELECT 1\0\0\0").as_bytes());
        let mut e = Expectations::default();
        let _ = rewrite(&p, &mut c, &mut old, &mut e, 10, &mut Vec::new());
    }
    // Another server with room for two: binding all three injects three Parses and
    // one eviction Close, all before the batch's Sync.
    let mut s = ServerStatements::default();
    let mut e = Expectations::default();
    for name in ["a", "b", "c"] {
        let b = msg(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
        assert!(rewrite(&b, &mut c, &mut s, &mut e, 2, &mut Vec::new()));
    }
    let _ = rewrite(&msg(b'S', b""), &mut c, &mut s, &mut e, 2, &mut Vec::new());
    assert!(s.contains("pgsl_3_2") && s.contains("pgsl_3_3") && !s.contains("pgsl_3_1"));
    // a's CloseComplete and ParseComplete arrive, then a's Execute fails: the Close of
    // a and the Parses of b and c are skipped.
    assert_eq!(e.on_complete(b'3', &mut c), Verdict::Strip);
    assert_eq!(e.on_complete(b'1', &mut c), Verdict::Strip);
    e.on_error(&mut s, &mut c);
    e.on_ready(b'I', &mut c);
    assert!(e.is_empty());
    assert!(
        s.contains("pgsl_3_1"),
        "a's Close was skipped: still prepared"
    );
    assert!(!s.contains("pgsl_3_2") && !s.contains("pgsl_3_3"));
    // Binding c again prepares it first.
    let mut out = Vec::new();
    let b = msg(b'B', b"\0c\0\0\0\0\0\0\0");
    assert!(rewrite(&b, &mut c, &mut s, &mut e, 10, &mut out));
    let close = msg(b'C', b"Spgsl_3_3\0");
    assert_eq!(&out[..close.len()], &close[..]);
    assert_eq!(out[close.len()], b'P');
}

#[test]
fn unnamed_and_unknown_pass_through() {
    let mut c = ClientStatements::new(1);
    let mut s = ServerStatements::default();
    let mut e = Expectations::default();
    let mut out = Vec::new();
    assert!(!rewrite(
        &msg(b'P', b"\0SELECT 1\0\0\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out
    ));
    assert!(!rewrite(
        &msg(b'B', b"\0nope\0\0\0\0\0\0\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out
    ));
    assert!(!rewrite(
        &msg(b'Q', b"DEALLOCATE ALL;\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out
    ));
}

#[test]
fn unnamed_is_parsed_again_in_a_later_batch_only() {
    let mut c = ClientStatements::new(1);
    let mut s = ServerStatements::default();
    let mut e = Expectations::default();
    let mut out = Vec::new();
    let parse = msg(b'P', b"\0SELECT $1::int\0\0\0");
    let bind = msg(b'B', b"\0\0\0\0\0\0\0\0");
    assert!(!rewrite(&parse, &mut c, &mut s, &mut e, 10, &mut out));
    // Same batch: the server holds the client's statement.
    assert!(!rewrite(&bind, &mut c, &mut s, &mut e, 10, &mut out));
    let _ = rewrite(&msg(b'S', b""), &mut c, &mut s, &mut e, 10, &mut out);
    // Later batch: the client's text goes first, and its ParseComplete is removed.
    let mut e = Expectations::default();
    assert!(rewrite(&bind, &mut c, &mut s, &mut e, 10, &mut out));
    assert_eq!((out[0], out[5]), (b'P', 0), "an unnamed Parse first");
    assert!(out.windows(11).any(|w| w == b"SELECT $1::"));
    assert!(e.holds(b'1'));
    assert_eq!(e.on_complete(b'1', &mut c), Verdict::Strip);
    // A simple Query destroys it: a later Bind closes whatever the server has instead.
    let _ = rewrite(
        &msg(b'Q', b"SELECT 1\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out,
    );
    let _ = rewrite(&msg(b'S', b""), &mut c, &mut s, &mut e, 10, &mut out);
    out.clear();
    let mut e = Expectations::default();
    assert!(rewrite(&bind, &mut c, &mut s, &mut e, 10, &mut out));
    assert_eq!(&out[..7], b"C\0\0\0\x06S\0");
    assert_eq!(e.on_complete(b'3', &mut c), Verdict::Strip);
}

#[test]
fn sql_deallocate_reaches_the_server_name() {
    let mut c = ClientStatements::new(5);
    let mut s = ServerStatements::default();
    let mut e = Expectations::default();
    let mut out = Vec::new();
    let _ = rewrite(
        &msg(b'P', b"a\0SELECT 1\0\0\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out,
    );
    out.clear();
    assert!(rewrite(
        &msg(b'Q', b"DEALLOCATE a\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out
    ));
    assert_eq!(&out[5..], b"DEALLOCATE pgsl_5_1\0");
    assert!(!s.contains("pgsl_5_1"));
    // Not on this server: a placeholder is prepared first, its CommandComplete removed.
    let _ = rewrite(
        &msg(b'P', b"b\0SELECT 2\0\0\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out,
    );
    let mut other = ServerStatements::default();
    let mut e = Expectations::default();
    out.clear();
    assert!(rewrite(
        &msg(b'Q', b"deallocate b;\0"),
        &mut c,
        &mut other,
        &mut e,
        10,
        &mut out
    ));
    assert_eq!(
        &out[5..],
        b"PREPARE pgsl_5_2 AS SELECT; DEALLOCATE pgsl_5_2\0"
    );
    assert!(e.holds(b'C'));
    assert_eq!(e.on_complete(b'C', &mut c), Verdict::Strip);
    assert_eq!(e.on_complete(b'C', &mut c), Verdict::Keep);
    // A name the client never prepared (SQL PREPARE) passes through.
    out.clear();
    assert!(!rewrite(
        &msg(b'Q', b"DEALLOCATE x\0"),
        &mut c,
        &mut s,
        &mut e,
        10,
        &mut out
    ));
}
