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

mod expect;
mod rewrite;
mod sql;
mod table;

pub use expect::{Def, Expect, Expectations, Verdict};
pub use rewrite::{rewrite, QUERY_HOLD};
pub use table::{ClientStatements, ServerStatements, Stmt};

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

#[cfg(test)]
mod tests;
