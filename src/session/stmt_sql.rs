//! The SQL statements of a simple Query that act on protocol-level prepared statements:
//! `DEALLOCATE [PREPARE] name`, `DEALLOCATE [PREPARE] ALL` and `DISCARD ALL`. Every
//! statement of a multi-statement query is looked at, after comments; quoted text is
//! skipped, so a `;` or a keyword inside a literal never counts.

/// What a query does to the client's prepared statements.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Some statement drops every prepared statement of the session.
    DropAll,
    /// The whole query is one `DEALLOCATE [PREPARE] name`; the name as PostgreSQL reads it.
    Deallocate(Vec<u8>),
}

/// A lexical token: a word (lower-cased), a quoted identifier, or a `;`.
#[derive(Debug, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a [u8]),
    /// The text between the quotes, `""` still doubled.
    Quoted(&'a [u8]),
    Semi,
    Other,
}

struct Lexer<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Lexer<'a> {
    /// The next token, or None at the end (also at an unterminated quote or comment).
    fn next(&mut self) -> Option<Tok<'a>> {
        let s = self.s;
        loop {
            while self.at < s.len() && s[self.at].is_ascii_whitespace() {
                self.at += 1;
            }
            let rest = &s[self.at..];
            if rest.starts_with(b"--") {
                self.at += memchr::memchr(b'\n', rest).map_or(rest.len(), |n| n + 1);
            } else if rest.starts_with(b"/*") {
                self.at += block_comment_len(rest)?;
            } else {
                break;
            }
        }
        let rest = &s[self.at..];
        let &c = rest.first()?;
        if c == b';' {
            self.at += 1;
            return Some(Tok::Semi);
        }
        if c == b'"' {
            let (name, n) = quoted_ident(rest)?;
            self.at += n;
            return Some(Tok::Quoted(name));
        }
        if c == b'\'' {
            self.at += string_len(rest, false)?;
            return Some(Tok::Other);
        }
        if (c == b'e' || c == b'E') && rest.get(1) == Some(&b'\'') {
            self.at += 1 + string_len(&rest[1..], true)?;
            return Some(Tok::Other);
        }
        if c == b'$' {
            if let Some(n) = dollar_len(rest) {
                self.at += n;
                return Some(Tok::Other);
            }
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let n = rest
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80))
                .unwrap_or(rest.len());
            self.at += n;
            return Some(Tok::Word(&rest[..n]));
        }
        self.at += 1;
        Some(Tok::Other)
    }
}

/// Length of a (nestable) block comment at the start of `s`.
fn block_comment_len(s: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while i + 1 < s.len() {
        match (s[i], s[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Length of a string literal starting at the quote `s[0]`; `escapes`: backslash escapes.
fn string_len(s: &[u8], escapes: bool) -> Option<usize> {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' if escapes => i += 2,
            b'\'' if s.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// A double-quoted identifier: its inner text and its length.
fn quoted_ident(s: &[u8]) -> Option<(&[u8], usize)> {
    let mut i = 1;
    while i < s.len() {
        if s[i] == b'"' {
            if s.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return Some((&s[1..i], i + 1));
        }
        i += 1;
    }
    None
}

fn unquote(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        out.push(raw[i]);
        i += if raw[i] == b'"' { 2 } else { 1 };
    }
    out
}

/// Length of a dollar-quoted string (`$tag$ ... $tag$`) at the start of `s`.
fn dollar_len(s: &[u8]) -> Option<usize> {
    let close = 1 + s[1..].iter().position(|&b| b == b'$')?;
    let tag = &s[..=close];
    if !tag[1..close]
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
        || tag.get(1).is_some_and(|b| b.is_ascii_digit())
    {
        return None;
    }
    let body = &s[tag.len()..];
    let end = memchr::memmem::find(body, tag)?;
    Some(tag.len() + end + tag.len())
}

fn is(tok: &Option<Tok>, word: &str) -> bool {
    matches!(tok, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(word.as_bytes()))
}

/// Looks at the first words of every statement of `sql`; linear in its length.
pub fn effect(sql: &[u8]) -> Effect {
    let mut lx = Lexer { s: sql, at: 0 };
    let mut statements = 0;
    let mut single: Option<Vec<u8>> = None;
    let mut drop_all = false;
    let mut at_start = true;
    for _ in 0..sql.len() + 1 {
        let Some(tok) = lx.next() else { break };
        if tok == Tok::Semi {
            at_start = true;
            continue;
        }
        if !at_start {
            continue;
        }
        at_start = false;
        statements += 1;
        let first = Some(tok);
        let mut second = lx.next();
        if is(&first, "discard") && is(&second, "all") {
            drop_all = true;
        } else if is(&first, "deallocate") {
            if is(&second, "prepare") {
                second = lx.next();
            }
            match second {
                Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"all") => drop_all = true,
                Some(Tok::Word(w)) => single = Some(w.to_ascii_lowercase()),
                Some(Tok::Quoted(q)) => single = Some(unquote(q)),
                _ => {}
            }
            if single.is_some() {
                // Only a statement that ends here names one statement to drop.
                match lx.next() {
                    None => {}
                    Some(Tok::Semi) => at_start = true,
                    Some(_) => single = None,
                }
            }
            continue;
        }
        if second == Some(Tok::Semi) {
            at_start = true;
        }
    }
    if drop_all {
        Effect::DropAll
    } else if let (Some(name), 1) = (single, statements) {
        Effect::Deallocate(name)
    } else {
        Effect::None
    }
}

/// Watches the part of a long query past what is held for [`effect`], as it streams by,
/// for the words `discard` and `deallocate` anywhere (quoting is not followed: a mention
/// in a literal counts too, which only costs re-preparing statements).
#[derive(Default)]
pub struct TailWatch {
    /// Bytes of each word matched so far.
    matched: [usize; 2],
    pub hit: bool,
}

const WORDS: [&[u8]; 2] = [b"discard", b"deallocate"];

impl TailWatch {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let b = b.to_ascii_lowercase();
            for (m, w) in self.matched.iter_mut().zip(WORDS) {
                // Neither word repeats its first letter, so a mismatch restarts at 0 or 1.
                *m = if w[*m] == b {
                    *m + 1
                } else {
                    usize::from(w[0] == b)
                };
                if *m == w.len() {
                    self.hit = true;
                    *m = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{effect, Effect};

    #[test]
    fn finds_drop_all_in_any_statement_after_comments() {
        for q in [
            "DISCARD ALL",
            "/* c */ DISCARD ALL",
            "-- c\ndiscard all;",
            "SET x = 1; DISCARD ALL",
            "select 1;deallocate   all",
            "DEALLOCATE PREPARE ALL",
            "/* a /* nested */ b */ Deallocate All",
        ] {
            assert_eq!(effect(q.as_bytes()), Effect::DropAll, "{q}");
        }
    }

    #[test]
    fn quoted_text_never_counts() {
        for q in [
            "SELECT 'x; DISCARD ALL'",
            "SELECT E'\\'; DISCARD ALL'",
            "SELECT $$; DISCARD ALL$$",
            "SELECT $t$ ; deallocate all $t$",
            "SELECT \"a;\" FROM t; -- ; DISCARD ALL",
            "SELECT 1 /* ; DISCARD ALL */",
            "DISCARD PLANS",
            "SELECT discard, all FROM t",
        ] {
            assert_eq!(effect(q.as_bytes()), Effect::None, "{q}");
        }
    }

    #[test]
    fn deallocate_of_one_name() {
        assert_eq!(
            effect(b"DEALLOCATE _pg3_0"),
            Effect::Deallocate(b"_pg3_0".to_vec())
        );
        assert_eq!(
            effect(b"deallocate prepare S1;"),
            Effect::Deallocate(b"s1".to_vec())
        );
        assert_eq!(
            effect(b"/* x */ DEALLOCATE \"My\"\"S\" ; "),
            Effect::Deallocate(b"My\"S".to_vec())
        );
        // Not alone, or not a plain name: passed through.
        assert_eq!(effect(b"DEALLOCATE a; SELECT 1"), Effect::None);
        assert_eq!(effect(b"SELECT 1; DEALLOCATE a"), Effect::None);
        assert_eq!(effect(b"DEALLOCATE a b"), Effect::None);
        assert_eq!(effect(b"DEALLOCATE"), Effect::None);
        assert_eq!(effect(b"DEALLOCATE 'a'"), Effect::None);
    }

    #[test]
    fn tail_watch_across_chunks() {
        let mut w = super::TailWatch::default();
        w.feed(b"select ddisc");
        w.feed(b"ARD");
        assert!(w.hit);
        let mut w = super::TailWatch::default();
        w.feed(b"deal dealloc ate discar");
        assert!(!w.hit);
    }

    #[test]
    fn odd_input_ends() {
        for q in [
            &b"'"[..],
            b"/*",
            b"\"",
            b"$a",
            b"E'",
            b"\xff\xfe",
            b";;;",
            b"",
        ] {
            let _ = effect(q);
        }
    }
}
