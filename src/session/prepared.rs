//! Named prepared statements under transaction pooling. A client's statements are renamed
//! to names unique to that client (`pgsl_<client>_<n>`), remembered with their Parse body,
//! and prepared transparently — pipelined ahead of the client's own Bind or Describe — on
//! whichever server connection the client lands on. The responses to those injected
//! messages (ParseComplete, CloseComplete) are removed from the stream back to the client.
//! Each server connection keeps a bounded set of prepared names, evicting the oldest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A client's statement as the server knows it.
pub struct Stmt {
    pub server_name: String,
    /// Parse body after the statement name: query string, parameter count and types.
    pub rest: Vec<u8>,
}

/// One client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    map: HashMap<Vec<u8>, Arc<Stmt>>,
    client_id: u64,
    next: u64,
}

impl ClientStatements {
    pub fn new(client_id: u64) -> Self {
        ClientStatements {
            map: HashMap::new(),
            client_id,
            next: 0,
        }
    }

    fn define(&mut self, name: &[u8], rest: &[u8]) -> Arc<Stmt> {
        self.next += 1;
        let s = Arc::new(Stmt {
            server_name: format!("pgsl_{}_{}", self.client_id, self.next),
            rest: rest.to_vec(),
        });
        self.map.insert(name.to_vec(), s.clone());
        s
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Names prepared on one server connection, oldest first.
#[derive(Default)]
pub struct ServerStatements {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl ServerStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.set.contains(name)
    }

    fn insert(&mut self, name: &str) {
        if self.set.insert(name.to_string()) {
            self.order.push_back(name.to_string());
        }
    }

    fn remove(&mut self, name: &str) {
        if self.set.remove(name) {
            self.order.retain(|n| n != name);
        }
    }

    pub fn clear(&mut self) {
        self.set.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// A response the server owes for a forwarded message, in order.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete; `strip` when the proxy injected the Parse; `name` to forget on error.
    Parse { strip: bool, name: String },
    /// CloseComplete; `name`: the server statement closed, if the proxy tracks it.
    Close { strip: bool, name: Option<String> },
    /// ReadyForQuery after a Sync.
    Sync,
}

/// What to do with a server message that answers an expected one.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Strip,
}

/// The response bookkeeping for the current server.
#[derive(Default)]
pub struct Expectations {
    queue: VecDeque<Expect>,
}

impl Expectations {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// ParseComplete ('1') or CloseComplete ('3') arrived.
    pub fn on_complete(&mut self, tag: u8) -> Verdict {
        match (tag, self.queue.front()) {
            (b'1', Some(Expect::Parse { strip, .. }))
            | (b'3', Some(Expect::Close { strip, .. })) => {
                let s = *strip;
                self.queue.pop_front();
                if s {
                    Verdict::Strip
                } else {
                    Verdict::Keep
                }
            }
            _ => Verdict::Keep,
        }
    }

    /// An ErrorResponse arrived: the server skips every message up to the next Sync, so
    /// no unanswered Parse or Close before it took effect. A skipped Parse (whether it
    /// failed or came after the failure) must not be remembered as prepared, and a
    /// statement whose Close was skipped is still prepared: preparing it again under the
    /// same name would fail.
    pub fn on_error(&mut self, server: &mut ServerStatements) {
        while let Some(e) = self.queue.front() {
            match e {
                Expect::Sync => break,
                Expect::Parse { name, .. } => server.remove(name),
                Expect::Close {
                    name: Some(name), ..
                } => server.insert(name),
                Expect::Close { name: None, .. } => {}
            }
            self.queue.pop_front();
        }
    }

    /// The newest `n` expected ReadyForQuery will not come: their Syncs reached a server
    /// in copy-in mode.
    pub fn forget_syncs(&mut self, n: usize) {
        for _ in 0..n {
            match self.queue.back() {
                Some(Expect::Sync) => {
                    self.queue.pop_back();
                }
                _ => break,
            }
        }
    }

    /// ReadyForQuery arrived.
    pub fn on_ready(&mut self) {
        while let Some(e) = self.queue.pop_front() {
            if matches!(e, Expect::Sync) {
                break;
            }
        }
    }
}

fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

fn put_msg(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.push(tag);
    out.extend_from_slice(&(len as i32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Rewrites one complete client message (`msg` includes type and length) for the server
/// that will receive it, recording which responses to expect. Returns true when `out`
/// holds the bytes to forward instead (possibly with injected messages before it).
pub fn rewrite(
    msg: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
    out: &mut Vec<u8>,
) -> bool {
    let tag = msg[0];
    let body = &msg[5..];
    match tag {
        b'P' => {
            let Some((name, rest)) = cstr(body) else {
                return false;
            };
            if name.is_empty() {
                expect.queue.push_back(Expect::Parse {
                    strip: false,
                    name: String::new(),
                });
                return false;
            }
            let stmt = client.define(name, rest);
            evict(out, server, expect, cap);
            put_msg(out, b'P', &[stmt.server_name.as_bytes(), &[0], rest]);
            server.insert(&stmt.server_name);
            expect.queue.push_back(Expect::Parse {
                strip: false,
                name: stmt.server_name.clone(),
            });
            true
        }
        b'B' => {
            let Some((portal, rest)) = cstr(body) else {
                return false;
            };
            let Some((name, params)) = cstr(rest) else {
                return false;
            };
            let Some(stmt) = (!name.is_empty())
                .then(|| client.map.get(name).cloned())
                .flatten()
            else {
                return false;
            };
            ensure(out, &stmt, server, expect, cap);
            put_msg(
                out,
                b'B',
                &[portal, &[0], stmt.server_name.as_bytes(), &[0], params],
            );
            true
        }
        b'D' | b'C' => {
            let Some((&kind, rest)) = body.split_first() else {
                return false;
            };
            if kind != b'S' {
                if tag == b'C' {
                    expect.queue.push_back(Expect::Close {
                        strip: false,
                        name: None,
                    });
                }
                return false;
            }
            let Some((name, _)) = cstr(rest) else {
                return false;
            };
            if name.is_empty() {
                if tag == b'C' {
                    expect.queue.push_back(Expect::Close {
                        strip: false,
                        name: None,
                    });
                }
                return false;
            }
            let Some(stmt) = client.map.get(name).cloned() else {
                if tag == b'C' {
                    expect.queue.push_back(Expect::Close {
                        strip: false,
                        name: None,
                    });
                }
                return false;
            };
            if tag == b'D' {
                ensure(out, &stmt, server, expect, cap);
            } else {
                client.map.remove(name);
                server.remove(&stmt.server_name);
                expect.queue.push_back(Expect::Close {
                    strip: false,
                    name: Some(stmt.server_name.clone()),
                });
            }
            put_msg(out, tag, &[b"S", stmt.server_name.as_bytes(), &[0]]);
            true
        }
        b'S' => {
            expect.queue.push_back(Expect::Sync);
            false
        }
        b'Q' => {
            // Statements that drop prepared statements wholesale: forget them here too.
            let sql = cstr(body).map(|(s, _)| s).unwrap_or(body);
            if let Some(words) = leading_words(sql) {
                match words.as_slice() {
                    [a, b, ..] if a == "deallocate" && b == "all" => {
                        client.clear();
                        server.clear();
                    }
                    [a, b, c, ..] if a == "deallocate" && b == "prepare" && c == "all" => {
                        client.clear();
                        server.clear();
                    }
                    [a, b, ..] if a == "discard" && b == "all" => {
                        client.clear();
                        server.clear();
                    }
                    _ => {}
                }
            }
            false
        }
        _ => false,
    }
}

/// Prepares `stmt` on the server first if it lacks it.
fn ensure(
    out: &mut Vec<u8>,
    stmt: &Stmt,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
) {
    if server.contains(&stmt.server_name) {
        return;
    }
    evict(out, server, expect, cap);
    put_msg(out, b'P', &[stmt.server_name.as_bytes(), &[0], &stmt.rest]);
    server.insert(&stmt.server_name);
    expect.queue.push_back(Expect::Parse {
        strip: true,
        name: stmt.server_name.clone(),
    });
}

/// Keeps the server's set under `cap` by closing the oldest statement.
fn evict(out: &mut Vec<u8>, server: &mut ServerStatements, expect: &mut Expectations, cap: usize) {
    while server.len() >= cap.max(1) {
        let Some(old) = server.order.pop_front() else {
            break;
        };
        server.set.remove(&old);
        put_msg(out, b'C', &[b"S", old.as_bytes(), &[0]]);
        expect.queue.push_back(Expect::Close {
            strip: true,
            name: Some(old),
        });
    }
}

/// The first three words of a short SQL string, lower-cased (None for long ones).
fn leading_words(sql: &[u8]) -> Option<Vec<String>> {
    let head = &sql[..sql.len().min(64)];
    let s = std::str::from_utf8(head).ok()?;
    Some(
        s.split(|c: char| c.is_whitespace() || c == ';')
            .filter(|w| !w.is_empty())
            .take(3)
            .map(|w| w.to_ascii_lowercase())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
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
        assert_eq!(e1.on_complete(b'1'), Verdict::Keep);
        // A second server has never seen the statement: Bind gets a Parse in front of it.
        let mut s2 = ServerStatements::default();
        let mut e2 = Expectations::default();
        let bind = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        out.clear();
        assert!(rewrite(&bind, &mut c, &mut s2, &mut e2, 10, &mut out));
        assert_eq!(out[0], b'P');
        assert!(s2.contains("pgsl_7_1"));
        assert_eq!(e2.on_complete(b'1'), Verdict::Strip);
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
        e.on_error(&mut s);
        assert!(!s.contains("pgsl_1_4"));
        e.on_ready();
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
        // a's ParseComplete arrives, then a's Execute fails: the Close of a and the
        // Parses of b and c are skipped.
        assert_eq!(e.on_complete(b'1'), Verdict::Strip);
        e.on_error(&mut s);
        e.on_ready();
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
        assert_eq!(out[0], b'P');
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
}
