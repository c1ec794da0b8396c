//! Text handling for session parameters: spotting statements that may change a setting,
//! building the queries the proxy injects, and reading the startup packet's parameters.

use super::{index, ParamSet, TRACKED};

/// What a client's SQL text may do to its settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    None,
    /// `SET ...`, `set_config(...)`: read values back after the transaction.
    Set,
    /// `RESET ...`, `DISCARD ...`: read back as well (a parameter the server no longer has
    /// SET returns to the client's startup value).
    Reset,
}

/// Looks at the first word of every statement (after each `;`, comments skipped) and for
/// `set_config`. A `;` inside a literal can only cause a needless read-back, never a miss of
/// a statement start; `UPDATE t SET x = 1` starts with UPDATE and is ignored.
pub fn classify(sql: &[u8]) -> Hit {
    let mut hit = Hit::None;
    let mut at = 0;
    loop {
        match first_words(&sql[at..]) {
            (Some(w), next) if w.eq_ignore_ascii_case(b"set") => {
                let scoped = next.is_some_and(|n| {
                    [&b"local"[..], b"transaction", b"constraints"]
                        .iter()
                        .any(|k| n.eq_ignore_ascii_case(k))
                });
                if !scoped && to_default(&sql[at..]) {
                    // `SET x TO DEFAULT` is a RESET.
                    return Hit::Reset;
                }
                if !scoped && hit == Hit::None {
                    hit = Hit::Set;
                }
            }
            (Some(w), _)
                if w.eq_ignore_ascii_case(b"reset") || w.eq_ignore_ascii_case(b"discard") =>
            {
                return Hit::Reset
            }
            _ => {}
        }
        match memchr::memchr(b';', &sql[at..]) {
            Some(i) => at += i + 1,
            None => break,
        }
    }
    if hit == Hit::None && mentions_set_config(sql) {
        hit = Hit::Set;
    }
    hit
}

/// The statement at the start of `s` (up to its `;`) ends with the word DEFAULT.
fn to_default(s: &[u8]) -> bool {
    let stmt = memchr::memchr(b';', s)
        .map_or(s, |n| &s[..n])
        .trim_ascii_end();
    stmt.len() > 7
        && stmt[stmt.len() - 7..].eq_ignore_ascii_case(b"default")
        && !is_word(stmt[stmt.len() - 8])
        && !matches!(stmt[stmt.len() - 8], b'\'' | b'"')
}

/// The tracked parameters (bit per position) a text RESETs: `RESET name`, `RESET ALL`,
/// `DISCARD ALL`, `SET name TO DEFAULT`, unless a later `SET` gives one a value. Nothing
/// when the text may roll back (ROLLBACK, ABORT): then the read-back decides.
pub fn reset_targets(sql: &[u8]) -> u16 {
    let all = (1u16 << TRACKED.len()) - 1;
    let mut out = 0u16;
    let mut at = 0;
    loop {
        let s = &sql[at..];
        if let Some((w, rest)) = word(s) {
            if w.eq_ignore_ascii_case(b"rollback") || w.eq_ignore_ascii_case(b"abort") {
                // A RESET may be undone: the read-back tells.
                return 0;
            }
            let next = word(rest);
            let bit = |n: &[u8]| {
                std::str::from_utf8(n)
                    .ok()
                    .and_then(index)
                    .map_or(0, |i| 1u16 << i)
            };
            if w.eq_ignore_ascii_case(b"reset") || w.eq_ignore_ascii_case(b"discard") {
                match next {
                    Some((n, _)) if n.eq_ignore_ascii_case(b"all") => out |= all,
                    Some((n, _)) if w.eq_ignore_ascii_case(b"reset") => out |= bit(n),
                    _ => {}
                }
            } else if w.eq_ignore_ascii_case(b"set") {
                let b = match next {
                    Some((n, r)) if n.eq_ignore_ascii_case(b"session") => {
                        word(r).map_or(0, |(n, _)| bit(n))
                    }
                    Some((n, _)) => bit(n),
                    None => 0,
                };
                // A later SET of a RESET parameter: its value is what the server reports.
                if to_default(s) {
                    out |= b;
                } else {
                    out &= !b;
                }
            }
        }
        match memchr::memchr(b';', &sql[at..]) {
            Some(i) => at += i + 1,
            None => break,
        }
    }
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The first two words of a statement, skipping white space and comments.
fn first_words(s: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    let Some((w, rest)) = word(s) else {
        return (None, None);
    };
    (Some(w), word(rest).map(|(w, _)| w))
}

fn word(mut s: &[u8]) -> Option<(&[u8], &[u8])> {
    loop {
        s = s.trim_ascii_start();
        if let Some(r) = s.strip_prefix(b"--") {
            s = memchr::memchr(b'\n', r).map_or(&[][..], |n| &r[n + 1..]);
        } else if let Some(r) = s.strip_prefix(b"/*") {
            s = memchr::memmem::find(r, b"*/").map_or(&[][..], |n| &r[n + 2..]);
        } else {
            break;
        }
    }
    let n = s.iter().position(|&b| !is_word(b)).unwrap_or(s.len());
    (n > 0).then(|| (&s[..n], &s[n..]))
}

fn mentions_set_config(sql: &[u8]) -> bool {
    memchr::memchr_iter(b'_', sql).any(|i| {
        i >= 3
            && sql[i - 3..i].eq_ignore_ascii_case(b"set")
            && sql
                .get(i + 1..i + 7)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"config"))
    })
}

/// A string literal that reads the same whatever `standard_conforming_strings` is.
fn literal(out: &mut String, v: &str) {
    out.push_str("E'");
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// `set_config` calls for `(index, value)` pairs, `local` for a validation that leaves
/// the server untouched.
fn set_configs(out: &mut String, pairs: &[(usize, &str)], local: bool) {
    out.push_str("SELECT ");
    for (n, (i, v)) in pairs.iter().enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push_str("pg_catalog.set_config('");
        out.push_str(TRACKED[*i]);
        out.push_str("', ");
        literal(out, v);
        out.push_str(if local { ", true)" } else { ", false)" });
    }
}

/// The query that brings a server from `have` to `want`.
pub fn sync_sql(want: &ParamSet, have: &ParamSet) -> String {
    let mut out = String::with_capacity(128);
    let sets: Vec<(usize, &str)> = (0..TRACKED.len())
        .filter(|&i| want.get(i) != have.get(i))
        .filter_map(|i| want.get(i).map(|v| (i, v)))
        .collect();
    if !sets.is_empty() {
        set_configs(&mut out, &sets, false);
        out.push(';');
    }
    for (i, name) in TRACKED.iter().enumerate() {
        if want.get(i).is_none() && have.get(i).is_some() {
            out.push_str("RESET ");
            out.push_str(name);
            out.push(';');
        }
    }
    out
}

/// Checks startup values the way the server would take them and returns them in its own
/// spelling (one row, one column per value), without changing the session.
pub fn validate_sql(pairs: &[(usize, &str)]) -> String {
    let mut out = String::new();
    set_configs(&mut out, pairs, true);
    out
}

/// Every tracked parameter's value and where it comes from: `source` is `session` exactly
/// when a SET (or set_config) is in force, even one to the default value; after RESET or
/// SET ... TO DEFAULT it is the reset value's source again. Names are schema-qualified: the
/// client's own search_path is in force.
pub fn read_back_sql() -> String {
    let mut out = String::from(
        "SELECT name, setting, source FROM pg_catalog.pg_settings \
         WHERE pg_catalog.lower(name) OPERATOR(pg_catalog.=) ANY (ARRAY[",
    );
    for (n, t) in TRACKED.iter().enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push('\'');
        out.push_str(&t.to_ascii_lowercase());
        out.push('\'');
    }
    out.push_str("])");
    out
}

/// A startup packet's parameters that the proxy keeps, as (tracked index, value), in order
/// (later ones win). `-c name=value` and `--name=value` in `options` count like separate
/// parameters. Anything else would silently not apply on a pooled connection, so it is
/// refused: (SQLSTATE, message).
pub fn from_startup(
    params: &[(String, String)],
) -> Result<Vec<(usize, String)>, (&'static str, String)> {
    let mut out = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for (name, value) in split_options(v)? {
                    out.push((tracked(&name)?, value));
                }
            }
            // Protocol extensions: ignored, as before.
            k if k.starts_with("_pq_.") => {}
            k => out.push((tracked(k)?, v.clone())),
        }
    }
    Ok(out)
}

fn tracked(name: &str) -> Result<usize, (&'static str, String)> {
    index(name).ok_or_else(|| {
        (
            "0A000",
            format!(
                "pgsluice: unsupported startup parameter \"{name}\" (only these are kept across pooled connections: {})",
                TRACKED.join(", ")
            ),
        )
    })
}

/// `options` as PostgreSQL splits it: white space separates, a backslash escapes the next
/// character.
fn split_options(s: &str) -> Result<Vec<(String, String)>, (&'static str, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let bad = |w: &str| {
        (
            "0A000",
            format!(
                "pgsluice: unsupported startup option \"{w}\" (only -c name=value is supported)"
            ),
        )
    };
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| bad(&w))?
        } else if let Some(r) = w.strip_prefix("-c") {
            r.to_string()
        } else if let Some(r) = w.strip_prefix("--") {
            r.to_string()
        } else {
            return Err(bad(&w));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(bad(&setting));
        };
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_statement_starts_only() {
        assert_eq!(classify(b"UPDATE t SET x = 1"), Hit::None);
        assert_eq!(classify(b"SELECT 'set'"), Hit::None);
        assert_eq!(classify(b"set search_path = a"), Hit::Set);
        assert_eq!(
            classify(b"  /* c */ -- x\n SET TimeZone TO 'UTC'"),
            Hit::Set
        );
        assert_eq!(
            classify(b"BEGIN; SELECT 1;\n  set statement_timeout=5"),
            Hit::Set
        );
        assert_eq!(classify(b"SET LOCAL search_path = a"), Hit::None);
        assert_eq!(
            classify(b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Hit::None
        );
        assert_eq!(
            classify(b"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Hit::Set
        );
        assert_eq!(classify(b"reset all"), Hit::Reset);
        assert_eq!(classify(b"SET TimeZone TO DEFAULT"), Hit::Reset);
        assert_eq!(classify(b"set a = default ; select 1"), Hit::Reset);
        assert_eq!(classify(b"SET a = 'default'"), Hit::Set);
        let tz = 1 << index("TimeZone").unwrap();
        let ds = 1 << index("DateStyle").unwrap();
        assert_eq!(
            reset_targets(b"RESET timezone; set DateStyle to default"),
            tz | ds
        );
        assert_eq!(
            reset_targets(b"SELECT 1; DISCARD ALL"),
            (1 << TRACKED.len()) - 1
        );
        assert_eq!(
            reset_targets(b"RESET enable_seqscan; SET TimeZone = 'UTC'"),
            0
        );
        assert_eq!(reset_targets(b"BEGIN; RESET ALL; ROLLBACK"), 0);
        assert_eq!(
            reset_targets(b"RESET TimeZone; RESET DateStyle; SET DateStyle = 'ISO, MDY'"),
            tz
        );
        assert_eq!(classify(b"SET a = 1; DISCARD ALL"), Hit::Reset);
        assert_eq!(
            classify(b"SELECT pg_catalog.SET_CONFIG('a', 'b', false)"),
            Hit::Set
        );
        assert_eq!(classify(b"SELECT settings FROM t"), Hit::None);
        assert_eq!(classify(b""), Hit::None);
        assert_eq!(classify(b"/* unterminated"), Hit::None);
    }

    #[test]
    fn sync_sets_and_resets_only_differences() {
        let mut want = ParamSet::default();
        let mut have = ParamSet::default();
        want.set(6, Some("a, \"b c\""));
        want.set(4, Some("it's\\"));
        have.set(7, Some("5s"));
        have.set(4, Some("it's\\"));
        let s = sync_sql(&want, &have);
        assert_eq!(
            s,
            "SELECT pg_catalog.set_config('search_path', E'a, \"b c\"', false);RESET statement_timeout;"
        );
        assert_eq!(sync_sql(&want, &want), "");
        want.set(4, Some("x'y"));
        assert!(sync_sql(&want, &have).contains("E'x\\'y'"));
    }

    #[test]
    fn startup_parameters_and_options() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let got = from_startup(&p(&[
            ("user", "u"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c search_path=a,\\ b --statement-timeout=5s -clock_timeout=1s",
            ),
            ("_pq_.x", "1"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            vec![
                (2, "ISO".to_string()),
                (6, "a, b".to_string()),
                (7, "5s".to_string()),
                (8, "1s".to_string())
            ]
        );
        let err = from_startup(&p(&[("work_mem", "1MB")])).unwrap_err();
        assert_eq!(err.0, "0A000");
        assert!(err.1.contains("work_mem"));
        assert!(from_startup(&p(&[("options", "-c work_mem=1MB")])).is_err());
        assert!(from_startup(&p(&[("options", "-B 100")])).is_err());
        assert!(from_startup(&p(&[("options", "-c")])).is_err());
        assert!(from_startup(&p(&[("options", "-c novalue")])).is_err());
    }

    #[test]
    fn read_back_names_every_tracked_parameter() {
        let q = read_back_sql();
        for t in TRACKED {
            assert!(q.contains(&format!("'{}'", t.to_ascii_lowercase())));
        }
    }
}
