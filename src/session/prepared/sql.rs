//! SQL texts that act on prepared statements (see `stmt_sql` for how they are recognised):
//! a simple Query's `DEALLOCATE name` is translated, `DISCARD ALL`/`DEALLOCATE ALL` are
//! tracked; the same for an unnamed extended-protocol statement (psycopg's pipeline mode
//! sends its `DEALLOCATE` that way).

use super::super::stmt_sql::{self, Effect, TailWatch};
use super::rewrite::ensure;
use super::{cstr, put_msg, ClientStatements, Expect, Expectations, ServerStatements};

/// A simple Query: track statements that drop prepared statements, translate a
/// `DEALLOCATE name` of a protocol-level statement.
pub(super) fn query(
    body: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
    out: &mut Vec<u8>,
) -> bool {
    // A Query cut at the hold limit has no terminating NUL (the text cannot contain one).
    let (sql, whole) = match cstr(body) {
        Some((s, _)) => (s, true),
        None => (body, false),
    };
    if !whole {
        client.rare().tail = Some(TailWatch::default());
    }
    match stmt_sql::effect(sql) {
        Effect::None => false,
        Effect::DropAll => {
            // Other clients' statements here are gone, or may be if the query fails.
            server.clear();
            let saved = std::mem::take(&mut client.rare().map);
            expect.queue.push_back(Expect::DropAll { saved });
            false
        }
        Effect::Deallocate(name) => {
            let Some(stmt) = (cap > 0).then(|| client.get(&name)).flatten() else {
                // A statement of SQL PREPARE, or none: the server answers as it would.
                return false;
            };
            if !whole {
                return false;
            }
            if let Some(r) = client.rare.as_mut() {
                r.tail = None;
            }
            let had = server.contains(&stmt.server_name);
            client.remove(&name);
            let sql = if had {
                server.remove(&stmt.server_name);
                format!("DEALLOCATE {}", stmt.server_name)
            } else {
                // Not prepared on this server: prepare a placeholder so that the answer
                // is DEALLOCATE's own, and remove the PREPARE's CommandComplete.
                expect.queue.push_back(Expect::Command);
                format!("PREPARE {0} AS SELECT; DEALLOCATE {0}", stmt.server_name)
            };
            put_msg(out, b'Q', &[sql.as_bytes(), &[0]]);
            expect.queue.push_back(Expect::Dealloc {
                client: name,
                stmt,
                had,
            });
            true
        }
    }
}

/// An unnamed Parse of `DEALLOCATE name` (a client's renamed statement) or of a statement
/// that drops them all. True when `out` holds the Parse to send instead; the client's
/// unnamed statement is then the rewritten one.
pub(super) fn unnamed_parse(
    rest: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    expect: &mut Expectations,
    cap: usize,
    out: &mut Vec<u8>,
) -> bool {
    let Some((sql, types)) = cstr(rest) else {
        return false;
    };
    if cap == 0 || sql.len() > super::QUERY_HOLD {
        return false;
    }
    match stmt_sql::effect(sql) {
        Effect::None => false,
        Effect::DropAll => {
            // Whether it runs is known only at its Execute: assume it does; the server's
            // statements are closed before they are prepared again either way.
            server.clear();
            client.clear();
            false
        }
        Effect::Deallocate(name) => {
            let Some(stmt) = client.remove(&name) else {
                return false;
            };
            // The server must hold it for DEALLOCATE to succeed, as it would directly.
            ensure(out, &stmt, server, expect, cap);
            server.remove(&stmt.server_name);
            let text = format!("DEALLOCATE {}", stmt.server_name);
            let u = &mut client.rare().unnamed;
            u.clear();
            u.extend_from_slice(text.as_bytes());
            u.push(0);
            u.extend_from_slice(types);
            put_msg(out, b'P', &[&[0], u]);
            true
        }
    }
}
