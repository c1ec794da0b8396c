//! The response bookkeeping: the answers a server owes for the messages forwarded to it,
//! and what each does to the statement tables when it arrives (or an error skips it).

use super::{ClientStatements, ServerStatements, Stmt};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
    pub(super) queue: VecDeque<Expect>,
}

impl Expectations {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// The number of the oldest batch not answered yet, if any.
    pub(super) fn first_open(&self) -> Option<u32> {
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
