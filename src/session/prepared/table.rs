//! The statement tables: a client's statements by its names, and the names prepared on
//! each server connection with what is known of each.

use super::Expectations;
use crate::pool::conn_state::Mark;
pub use crate::pool::conn_state::ServerStatements;
use crate::session::stmt_sql::TailWatch;
use std::collections::HashMap;
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
    pub(super) rare: Option<Box<Rare>>,
}

#[derive(Default)]
pub(super) struct Rare {
    /// Named statements by the client's name.
    pub(super) map: HashMap<Vec<u8>, Arc<Stmt>>,
    /// Parse body of the client's unnamed statement, valid when `has_unnamed`.
    pub(super) unnamed: Vec<u8>,
    pub(super) has_unnamed: bool,
    /// Bumped at each unnamed Parse: matches late answers to the Parse they belong to.
    pub(super) unnamed_gen: u64,
    /// The server holds the client's unnamed statement: parsed in the current batch.
    pub(super) unnamed_fresh: bool,
    /// The same, confirmed by a ParseComplete on a server the client still keeps.
    pub(super) unnamed_confirmed: bool,
    /// The rest of a query too long to be held is streaming by.
    pub(super) tail: Option<TailWatch>,
}

impl ClientStatements {
    pub fn new(client_id: u64) -> Self {
        ClientStatements {
            client_id,
            ..Default::default()
        }
    }

    pub(super) fn define(&mut self, name: &[u8], rest: &[u8]) -> Arc<Stmt> {
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

    pub(super) fn get(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        self.rare.as_ref()?.map.get(name).cloned()
    }

    pub(super) fn remove(&mut self, name: &[u8]) -> Option<Arc<Stmt>> {
        self.rare.as_mut()?.map.remove(name)
    }

    pub(super) fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The unnamed statement on the server is not known to be the client's any more.
    pub(super) fn unconfirm(&mut self) {
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

    pub(super) fn forget_unnamed(&mut self) {
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

impl ServerStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.marks.get(name).is_some_and(|m| m.present)
    }

    pub(super) fn insert(&mut self, name: &str) {
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

    pub(super) fn remove(&mut self, name: &str) {
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
    pub(super) fn touch(&mut self, name: &str, defining: bool, expect: &Expectations) {
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
    pub(super) fn unsure(&self, name: &str, expect: &Expectations) -> bool {
        self.marks
            .get(name)
            .is_some_and(|m| self.unresolved_earlier(m.batch, expect))
    }

    /// `unsure`, and that was a client's Parse defining its statement under `name`.
    pub(super) fn defined_unresolved(&self, name: &str, expect: &Expectations) -> bool {
        self.marks
            .get(name)
            .is_some_and(|m| m.defining && self.unresolved_earlier(m.batch, expect))
    }

    /// A later batch than `batch` sent a Parse or Close of `name`: that one decides.
    pub(super) fn touched_after(&self, name: &str, batch: u32) -> bool {
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
