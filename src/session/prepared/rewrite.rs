//! The rewriting of a client's Parse, Bind, Describe, Close, Sync and Query for the server
//! that receives them: renaming, injecting Parses and Closes where needed, evicting.

use super::{
    cstr, put_msg, sql, ClientStatements, Def, Expect, Expectations, ServerStatements, Stmt,
};
use std::sync::Arc;

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
pub(super) fn ensure(
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
