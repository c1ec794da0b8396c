//! Prepared statements under transaction pooling.
//!
//! Named: a client's statements are renamed to names unique to that client
//! (`pgsl_<client>_<n>`), remembered with their Parse body, and prepared transparently —
//! pipelined ahead of the client's own Bind or Describe — on whichever server connection the
//! client lands on. Each server connection keeps a bounded set of prepared names, evicting
//! the oldest. A Parse of a name the client has already fails with 42P05 as it would
//! directly: it is sent under a name the server holds (the statement's own, or a
//! placeholder), so that the server checks the query first and skips the rest of the batch.
//!
//! Several batches may be written before the first is answered, each rewritten as if those
//! before succeeded. An error skips the Parse and Close messages after it in its batch only,
//! so a name parsed or closed in a batch still unanswered is not known to be prepared or
//! not: a later batch closes and prepares it again before using it (unless that was the
//! client's own defining Parse, whose failure makes the use fail as it would directly).
//!
//! Unnamed: PostgreSQL keeps the unnamed statement until the next Parse of it or simple
//! Query, so the one a server holds may be another client's. A Bind or Describe of it in
//! the batch of the client's own Parse needs nothing; in a later batch the client's last
//! unnamed Parse is sent again first (or a Close, when the client has none, so that the
//! Bind fails as it would directly) unless its server, kept inside a transaction, is known
//! to still hold it.
//!
//! SQL-level `DEALLOCATE name` is translated to the server's name; `DEALLOCATE ALL` and
//! `DISCARD ALL` in any statement of a query are tracked (see `stmt_sql`). The responses to
//! injected messages (ParseComplete, CloseComplete, one CommandComplete) are removed from
//! the stream back to the client.

use super::stmt_sql::TailWatch;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A client's statement as the server knows it.
#[derive(Debug)]
pub struct Stmt {
    pub server_name: String,
    /// Parse body after the statement name: query string, parameter count and types.
    pub rest: Vec<u8>,
}

/// One client's statements.
#[derive(Default)]
pub struct ClientStatements {
    client_id: u64,
    next: u64,
    /// Boxed, allocated at first use: every session carries this struct (several times
    /// over in its future), not every session prepares statements.
    rare: Option<Box<Rare>>,
}

#[derive(Default)]
struct Rare {
    /// Named statements by the client's name.
    map: HashMap<Vec<u8>, Arc<Stmt>>,
    /// Parse body of the client's unnamed statement, valid when `has_unnamed`.
    unnamed: Vec<u8>,
    has_unnamed: bool,
    /// Bumped at each unnamed Parse: matches late answers to the Parse they belong to.
    unnamed_gen: u64,
    /// The server holds the client's unnamed statement: parsed in the current batch.
    unnamed_fresh: bool,
    /// The same, confirmed by a ParseComplete on a server the client still keeps.
    unnamed_confirmed: bool,
    /// The rest of a query too long to be held is streaming by.
    tail: Option<TailWatch>,
}

impl ClientStatements {
    pub fn new(client_id: u64) -> Self {
        ClientStatements {
            client_id,
            ..Default::default()
        }
    }

    fn define(&mut self, name: &[u8], rest: &[u8]) -> Arc<Stmt> {
        self.next += 1;
        let s = Arc::new(Stmt {
            server_name: format!("pgsl_{}_{}", self.client_id, self.next),
            rest: rest.to_vec(),
        });
        self.rare().map.insert(name.to_vec(), s.clone());
        s
    }

    pub fn clear(&mut self) {
        if let Some(r) = self.rare.as_mut() {
            r.map.clear();
        }
    }

    fn get(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        self.rare.as_ref()?.map.get(name).cloned()
    }

    fn remove(&mut self, name: &[u8]) -> Option<Arc<Stmt>> {
        self.rare.as_mut()?.map.remove(name)
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The unnamed statement on the server is not known to be the client's any more.
    fn unconfirm(&mut self) {
        if let Some(r) = self.rare.as_mut() {
            r.unnamed_confirmed = false;
        }
    }

    /// The server connection went away or is given up: nothing on the next one is known.
    pub fn server_lost(&mut self) {
        if let Some(r) = self.rare.as_mut() {
            r.tail = None;
            r.unnamed_fresh = false;
            r.unnamed_confirmed = false;
        }
    }

    /// Bytes of a long query streaming to `server`; `last`: its end is among them. A
    /// mention of DISCARD or DEALLOCATE there may have dropped any statement on the server.
    pub fn watch_tail(&mut self, bytes: &[u8], last: bool, server: &mut ServerStatements) {
        let Some(r) = self.rare.as_mut() else {
            return;
        };
        let Some(w) = r.tail.as_mut() else {
            return;
        };
        w.feed(bytes);
        if w.hit {
            // Injected Parses close their name first: one still prepared is no harm.
            server.clear();
        }
        if last || w.hit {
            r.tail = None;
        }
    }

    fn forget_unnamed(&mut self) {
        let Some(r) = self.rare.as_mut() else {
            return;
        };
        r.has_unnamed = false;
        r.unnamed_fresh = false;
        r.unnamed_confirmed = false;
        if r.unnamed.capacity() > 64 * 1024 {
            r.unnamed = Vec::new();
        }
    }
}

/// Names prepared on one server connection, oldest first.
#[derive(Default)]
pub struct ServerStatements {
    /// Every name prepared here (`present`), and those whose last Parse or Close went out in
    /// a batch perhaps not answered yet.
    marks: HashMap<String, Mark>,
    /// The names prepared here, oldest first.
    order: VecDeque<String>,
    /// The number of the batch being written to this connection (wrapping).
    batch: u32,
}

/// What is known of one name on a server connection.
#[derive(Clone, Copy)]
struct Mark {
    present: bool,
    /// The batch of the last Parse or Close of the name sent: while that batch is
    /// unanswered, an error in it may leave the name other than `present` says.
    batch: u32,
    /// That was a client's Parse defining the statement under this name.
    defining: bool,
}

impl ServerStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.marks.get(name).is_some_and(|m| m.present)
    }

    fn insert(&mut self, name: &str) {
        // Untouched: as far back as can be.
        let batch = self.batch.wrapping_add(1 << 31);
        let m = self.marks.entry(name.to_string()).or_insert(Mark {
            present: false,
            batch,
            defining: false,
        });
        if !m.present {
            m.present = true;
            self.order.push_back(name.to_string());
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(m) = self.marks.get_mut(name) {
            if m.present {
                m.present = false;
                self.order.retain(|n| n != name);
            }
        }
    }

    pub fn clear(&mut self) {
        self.marks.clear();
        self.order.clear();
    }

    /// A Parse or Close of `name` goes out in the current batch; `defining`: a client's
    /// Parse of its statement under that name.
    fn touch(&mut self, name: &str, defining: bool, expect: &Expectations) {
        if self.marks.len() > 2 * self.order.len() + 64 {
            let open = self.open_span(expect);
            let now = self.batch;
            self.marks
                .retain(|_, m| m.present || now.wrapping_sub(m.batch) <= open);
        }
        let batch = self.batch;
        let m = self.marks.entry(name.to_string()).or_insert(Mark {
            present: false,
            batch,
            defining,
        });
        m.batch = batch;
        m.defining = defining;
    }

    /// How many batches back the oldest unanswered one is (0: none).
    fn open_span(&self, expect: &Expectations) -> u32 {
        expect
            .first_open()
            .map_or(0, |f| self.batch.wrapping_sub(f))
    }

    /// Batch `b` was written before the current one and is not answered yet.
    fn unresolved_earlier(&self, b: u32, expect: &Expectations) -> bool {
        let back = self.batch.wrapping_sub(b);
        back > 0 && back <= self.open_span(expect)
    }

    /// The last Parse or Close of `name` went out in an earlier batch that is still
    /// unanswered: the set's word on it holds only if that batch succeeds.
    fn unsure(&self, name: &str, expect: &Expectations) -> bool {
        self.marks
            .get(name)
            .is_some_and(|m| self.unresolved_earlier(m.batch, expect))
    }

    /// `unsure`, and that was a client's Parse defining its statement under `name`.
    fn defined_unresolved(&self, name: &str, expect: &Expectations) -> bool {
        self.marks
            .get(name)
            .is_some_and(|m| m.defining && self.unresolved_earlier(m.batch, expect))
    }

    /// A later batch than `batch` sent a Parse or Close of `name`: that one decides.
    fn touched_after(&self, name: &str, batch: u32) -> bool {
        self.marks
            .get(name)
            .is_some_and(|m| (m.batch.wrapping_sub(batch) as i32) > 0)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A response the server owes for a forwarded message, in order.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete; `strip` when the proxy injected the Parse; `name` (if tracked) to
    /// forget on error; `unnamed`: the generation of an unnamed Parse.
    Parse {
        strip: bool,
        name: String,
        unnamed: Option<u64>,
        def: Def,
    },
    /// CloseComplete; `name`: the server statement closed, if the proxy tracks it.
    Close { strip: bool, name: Option<String> },
    /// The CommandComplete of an injected SQL `PREPARE` (removed).
    Command,
    /// A translated `DEALLOCATE`: the client's statement, given back if it fails;
    /// `had`: it was prepared on the server.
    Dealloc {
        client: Vec<u8>,
        stmt: Arc<Stmt>,
        had: bool,
    },
    /// A query with `DISCARD ALL`/`DEALLOCATE ALL`: the client's statements before it,
    /// given back if the query fails.
    DropAll { saved: HashMap<Vec<u8>, Arc<Stmt>> },
    /// ReadyForQuery after a Sync (or a simple Query, or a FunctionCall) ending the batch
    /// numbered `batch`.
    Sync { batch: u32 },
}

/// What a client's named Parse does to the client's statements once answered.
#[derive(Debug)]
pub enum Def {
    None,
    /// It defined the statement: forgotten if the Parse fails or is skipped.
    New(Vec<u8>, Arc<Stmt>),
    /// A Parse of a name whose defining Parse, in an earlier batch, was unanswered when
    /// sent (under the same server name): it defines the statement if that one failed.
    Retry(Vec<u8>, Arc<Stmt>),
}

/// What to do with a server message that answers an expected one.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Strip,
}

/// The response bookkeeping for the current server.
///
/// Batches (each ending in an expected ReadyForQuery) are numbered per server connection
/// (see [`ServerStatements`]); the answers still owed are those of the batches whose Syncs
/// are queued.
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

    /// The number of the oldest batch not answered yet, if any.
    fn first_open(&self) -> Option<u32> {
        self.queue.iter().find_map(|e| match e {
            Expect::Sync { batch } => Some(*batch),
            _ => None,
        })
    }

    /// A Sync goes out after the messages already recorded: their batch ends there.
    pub fn push_sync(&mut self, server: &mut ServerStatements) {
        self.queue.push_back(Expect::Sync {
            batch: server.batch,
        });
        server.batch = server.batch.wrapping_add(1);
    }

    /// A message of type `tag` being received may have to be removed: hold it back.
    pub fn holds(&self, tag: u8) -> bool {
        matches!(
            (tag, self.queue.front()),
            (b'1', Some(Expect::Parse { strip: true, .. }))
                | (b'3', Some(Expect::Close { strip: true, .. }))
                | (b'C', Some(Expect::Command))
        )
    }

    /// ParseComplete ('1'), CloseComplete ('3') or CommandComplete ('C') arrived.
    pub fn on_complete(&mut self, tag: u8, client: &mut ClientStatements) -> Verdict {
        let verdict = match (tag, self.queue.front()) {
            (
                b'1',
                Some(Expect::Parse {
                    strip,
                    unnamed,
                    def,
                    ..
                }),
            ) => {
                if let Some(r) = client.rare.as_mut() {
                    if *unnamed == Some(r.unnamed_gen) && r.has_unnamed {
                        r.unnamed_confirmed = true;
                    }
                }
                if let Def::Retry(name, stmt) = def {
                    // The earlier defining Parse failed: this one took its place.
                    client
                        .rare()
                        .map
                        .entry(name.clone())
                        .or_insert_with(|| stmt.clone());
                }
                *strip
            }
            (b'3', Some(Expect::Close { strip, .. })) => *strip,
            (b'C', Some(Expect::Command)) => true,
            (b'C', Some(Expect::Dealloc { .. })) => false,
            _ => return Verdict::Keep,
        };
        self.queue.pop_front();
        if verdict {
            Verdict::Strip
        } else {
            Verdict::Keep
        }
    }

    /// An ErrorResponse arrived: the server skips every message up to the next Sync, so
    /// no unanswered Parse or Close before it took effect. A skipped Parse (whether it
    /// failed or came after the failure) must not be remembered as prepared, and a
    /// statement whose Close was skipped is still prepared: preparing it again under the
    /// same name would fail.
    ///
    /// A name that a later batch, written before this answer, parsed or closed again is left
    /// as that batch's rewriting set it: its own answers decide.
    pub fn on_error(&mut self, server: &mut ServerStatements, client: &mut ClientStatements) {
        // Whatever unnamed statement the server holds now is not known to be the client's.
        client.unconfirm();
        let batch = self.first_open();
        while let Some(e) = self.queue.front() {
            if matches!(e, Expect::Sync { .. }) {
                break;
            }
            let Some(e) = self.queue.pop_front() else {
                break;
            };
            match e {
                Expect::Parse {
                    name, unnamed, def, ..
                } => {
                    if !batch.is_some_and(|b| server.touched_after(&name, b)) {
                        server.remove(&name);
                    }
                    if let Def::New(c, stmt) = def {
                        if client.get(&c).is_some_and(|s| Arc::ptr_eq(&s, &stmt)) {
                            client.remove(&c);
                        }
                    }
                    if unnamed.is_some() && unnamed == client.rare.as_ref().map(|r| r.unnamed_gen) {
                        client.forget_unnamed();
                    }
                }
                Expect::Close {
                    name: Some(name), ..
                } if !batch.is_some_and(|b| server.touched_after(&name, b)) => server.insert(&name),
                Expect::Dealloc {
                    client: c,
                    stmt,
                    had,
                } => {
                    if had {
                        server.insert(&stmt.server_name);
                    }
                    client.rare().map.entry(c).or_insert(stmt);
                }
                Expect::DropAll { saved } => {
                    // It may have run before the error; the server's list is empty and
                    // every injected Parse closes its name first, so statements given back are
                    // prepared again safely.
                    for (k, v) in saved {
                        client.rare().map.entry(k).or_insert(v);
                    }
                }
                _ => {}
            }
        }
    }

    /// Every batch rewritten for this server goes to another one unanswered (a dead server's
    /// batches are resent): the client's statements go back to what they were before those
    /// batches were rewritten, so the resend rewrites them as the first time. Without this,
    /// a resent defining Parse finds its name taken and fails with 42P05.
    pub fn unwind(&mut self, client: &mut ClientStatements) {
        // Newest first: a name defined and closed in the same batches ends as before both.
        while let Some(e) = self.queue.pop_back() {
            match e {
                Expect::Parse {
                    def: Def::New(c, stmt),
                    ..
                } if client.get(&c).is_some_and(|s| Arc::ptr_eq(&s, &stmt)) => {
                    client.remove(&c);
                }
                Expect::Dealloc {
                    client: c, stmt, ..
                } => {
                    client.rare().map.entry(c).or_insert(stmt);
                }
                Expect::DropAll { saved } => {
                    for (k, v) in saved {
                        client.rare().map.entry(k).or_insert(v);
                    }
                }
                _ => {}
            }
        }
        client.server_lost();
    }

    /// The newest `n` expected ReadyForQuery will not come: their Syncs reached a server
    /// in copy-in mode.
    pub fn forget_syncs(&mut self, n: usize) {
        for _ in 0..n {
            match self.queue.back() {
                Some(Expect::Sync { .. }) => {
                    self.queue.pop_back();
                }
                _ => break,
            }
        }
    }

    /// ReadyForQuery with transaction status `status` arrived.
    pub fn on_ready(&mut self, status: u8, client: &mut ClientStatements) {
        if status == b'I' {
            // Outside a transaction the server goes back to the pool.
            client.unconfirm();
        }
        while let Some(e) = self.queue.pop_front() {
            if matches!(e, Expect::Sync { .. }) {
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

/// Bytes of a simple Query held for rewriting (the rest of a longer one streams through).
pub const QUERY_HOLD: usize = 8192;

/// Rewrites one complete client message (`msg` includes type and length; a simple Query
/// may be cut at [`QUERY_HOLD`]) for the server that will receive it, recording which
/// responses to expect. Returns true when `out` holds the bytes to forward instead
/// (possibly with injected messages before it).
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
                let replaced = sql::unnamed_parse(rest, client, server, expect, cap, out);
                let r = client.rare();
                if !replaced {
                    r.unnamed.clear();
                    r.unnamed.extend_from_slice(rest);
                }
                r.has_unnamed = true;
                r.unnamed_gen += 1;
                r.unnamed_fresh = true;
                r.unnamed_confirmed = false;
                let gen = r.unnamed_gen;
                expect.queue.push_back(Expect::Parse {
                    strip: false,
                    name: String::new(),
                    unnamed: Some(gen),
                    def: Def::None,
                });
                return replaced;
            }
            if cap == 0 {
                expect.queue.push_back(Expect::Parse {
                    strip: false,
                    name: String::new(),
                    unnamed: None,
                    def: Def::None,
                });
                return false;
            }
            if let Some(stmt) = client.get(name) {
                duplicate(name, rest, &stmt, server, expect, cap, out);
                return true;
            }
            let stmt = client.define(name, rest);
            evict(out, server, expect, cap);
            put_msg(out, b'P', &[stmt.server_name.as_bytes(), &[0], rest]);
            server.insert(&stmt.server_name);
            server.touch(&stmt.server_name, true, expect);
            expect.queue.push_back(Expect::Parse {
                strip: false,
                name: stmt.server_name.clone(),
                unnamed: None,
                def: Def::New(name.to_vec(), stmt.clone()),
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
            if name.is_empty() {
                return use_unnamed(msg, client, expect, out);
            }
            let Some(stmt) = (cap > 0).then(|| client.get(name)).flatten() else {
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
            let untracked_close = |expect: &mut Expectations| {
                if tag == b'C' {
                    expect.queue.push_back(Expect::Close {
                        strip: false,
                        name: None,
                    });
                }
            };
            let Some((&kind, rest)) = body.split_first() else {
                return false;
            };
            let name = cstr(rest).map(|(n, _)| n);
            match (kind, name) {
                (b'S', Some([])) if tag == b'D' => return use_unnamed(msg, client, expect, out),
                (b'S', Some([])) => {
                    // The server now has no unnamed statement, nor has the client.
                    client.forget_unnamed();
                    client.rare().unnamed_fresh = true;
                    untracked_close(expect);
                    return false;
                }
                (b'S', Some(_)) => {}
                _ => {
                    untracked_close(expect);
                    return false;
                }
            }
            let name = name.unwrap_or_default();
            let Some(stmt) = (cap > 0).then(|| client.get(name)).flatten() else {
                untracked_close(expect);
                return false;
            };
            if tag == b'D' {
                ensure(out, &stmt, server, expect, cap);
            } else {
                client.remove(name);
                server.remove(&stmt.server_name);
                server.touch(&stmt.server_name, false, expect);
                expect.queue.push_back(Expect::Close {
                    strip: false,
                    name: Some(stmt.server_name.clone()),
                });
            }
            put_msg(out, tag, &[b"S", stmt.server_name.as_bytes(), &[0]]);
            true
        }
        b'S' => {
            if let Some(r) = client.rare.as_mut() {
                r.unnamed_fresh = false;
            }
            expect.push_sync(server);
            false
        }
        b'F' => {
            expect.push_sync(server);
            false
        }
        b'Q' => {
            // A simple Query destroys the unnamed statement.
            client.forget_unnamed();
            let replaced = sql::query(body, client, server, expect, cap, out);
            expect.push_sync(server);
            replaced
        }
        _ => false,
    }
}

/// A Bind or Describe of the unnamed statement (`msg`).
fn use_unnamed(
    msg: &[u8],
    client: &mut ClientStatements,
    expect: &mut Expectations,
    out: &mut Vec<u8>,
) -> bool {
    let r = client.rare();
    if r.unnamed_fresh || r.unnamed_confirmed {
        return false;
    }
    if r.has_unnamed {
        put_msg(out, b'P', &[&[0], &r.unnamed]);
        expect.queue.push_back(Expect::Parse {
            strip: true,
            name: String::new(),
            unnamed: Some(r.unnamed_gen),
            def: Def::None,
        });
    } else {
        // The server's unnamed statement, if any, is not this client's: drop it, and the
        // Bind fails with 26000 as it would on the client's own connection.
        put_msg(out, b'C', &[b"S", &[0]]);
        expect.queue.push_back(Expect::Close {
            strip: true,
            name: None,
        });
    }
    r.unnamed_fresh = true;
    out.extend_from_slice(msg);
    true
}

/// Prepares `stmt` on the server first if it lacks it.
fn ensure(
    out: &mut Vec<u8>,
    stmt: &Stmt,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
) {
    let name = &stmt.server_name;
    if server.contains(name)
        && (!server.unsure(name, expect) || server.defined_unresolved(name, expect))
    {
        // Prepared here, or to be by the client's own Parse in an earlier batch: if that
        // fails, so does this use, as it would directly (and the statement is forgotten).
        return;
    }
    if server.contains(name) {
        // Prepared again below: evicting must not pick it.
        server.remove(name);
    }
    evict(out, server, expect, cap);
    server.touch(name, false, expect);
    // Closed first even where the set says it is absent: the name only ever holds this
    // statement, so a Close costs one message and makes the Parse unable to fail with
    // 42P05 should the set be wrong (seen under load, not explained), and a statement left
    // by a DISCARD ALL or DEALLOCATE ALL that failed part-way (the set is emptied) is no harm.
    put_msg(out, b'C', &[b"S", stmt.server_name.as_bytes(), &[0]]);
    expect.queue.push_back(Expect::Close {
        strip: true,
        name: None,
    });
    put_msg(out, b'P', &[stmt.server_name.as_bytes(), &[0], &stmt.rest]);
    server.insert(&stmt.server_name);
    expect.queue.push_back(Expect::Parse {
        strip: true,
        name: stmt.server_name.clone(),
        unnamed: None,
        def: Def::None,
    });
}

/// A name every server may hold, prepared with an empty query, for [`duplicate`].
const DUP_NAME: &str = "pgsl_dup";

/// A client's Parse of a name it has prepared already: PostgreSQL checks the query, then
/// fails with 42P05. So does the server, given the Parse under a name it holds.
fn duplicate(
    name: &[u8],
    rest: &[u8],
    stmt: &Arc<Stmt>,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
    out: &mut Vec<u8>,
) {
    let own = &stmt.server_name;
    let (target, def) = if server.defined_unresolved(own, expect) {
        // Whether the statement exists depends on its defining Parse: under the same name,
        // this one fails if that succeeded, and takes its place if not.
        let again = Arc::new(Stmt {
            server_name: own.clone(),
            rest: rest.to_vec(),
        });
        server.touch(own, true, expect);
        (own.clone(), Def::Retry(name.to_vec(), again))
    } else if server.contains(own) && !server.unsure(own, expect) {
        (own.clone(), Def::None)
    } else {
        if !server.contains(DUP_NAME) || server.unsure(DUP_NAME, expect) {
            server.remove(DUP_NAME);
            evict(out, server, expect, cap);
            server.touch(DUP_NAME, false, expect);
            put_msg(out, b'C', &[b"S", DUP_NAME.as_bytes(), &[0]]);
            expect.queue.push_back(Expect::Close {
                strip: true,
                name: None,
            });
            put_msg(out, b'P', &[DUP_NAME.as_bytes(), &[0], &[0], &[0, 0]]);
            server.insert(DUP_NAME);
            expect.queue.push_back(Expect::Parse {
                strip: true,
                name: DUP_NAME.to_string(),
                unnamed: None,
                def: Def::None,
            });
        }
        (DUP_NAME.to_string(), Def::None)
    };
    put_msg(out, b'P', &[target.as_bytes(), &[0], rest]);
    // Nothing to forget if it fails: the name was prepared before.
    expect.queue.push_back(Expect::Parse {
        strip: false,
        name: String::new(),
        unnamed: None,
        def,
    });
}

/// Keeps the server's set under `cap` by closing the oldest statement.
fn evict(out: &mut Vec<u8>, server: &mut ServerStatements, expect: &mut Expectations, cap: usize) {
    while server.len() >= cap.max(1) {
        let Some(old) = server.order.pop_front() else {
            break;
        };
        server.touch(&old, false, expect);
        if let Some(m) = server.marks.get_mut(&old) {
            m.present = false;
        }
        put_msg(out, b'C', &[b"S", old.as_bytes(), &[0]]);
        expect.queue.push_back(Expect::Close {
            strip: true,
            name: Some(old),
        });
    }
}

#[path = "prepared_sql.rs"]
mod sql;

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;
