//! Named statements in transaction mode when a Parse fails, checked against PostgreSQL
//! itself: every step runs once through pgsluice (several clients, one server connection)
//! and once on direct connections (one per client), and the two must answer alike, message
//! for message (errors by SQLSTATE: their texts name the server's statement names).
//!
//! - A Parse of a name the client has prepared already fails with 42P05 (after the query
//!   is checked), and the rest of its batch is skipped, whether or not the statement is on
//!   the server connection the client has at the time.
//! - A named Parse that fails leaves the name free.
//! - In one write of several batches, an error in one (skipping a statement the proxy
//!   prepares ahead of a Bind) must not make a later batch's Bind of it fail.

mod common;

use common::steps::{differential, step};

fn flags(cap: &'static str) -> [&'static str; 6] {
    [
        "--pool-mode",
        "transaction",
        "--pool-size",
        "1",
        "--max-prepared-statements",
        cap,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_parse_fails_as_directly() {
    let (a, b) = (0, 1);
    let steps = [
        step(a, "A parses s", 1, |k| {
            k.parse("s", "SELECT 'A1:' || $1::text").sync();
        }),
        step(a, "A parses s again", 1, |k| {
            k.parse("s", "SELECT 'A2:' || $1::text").sync();
        }),
        step(
            a,
            "A parses s again, then binds it in the same batch",
            1,
            |k| {
                k.parse("s", "SELECT 'A3:' || $1::text")
                    .bind("s", &["x"])
                    .execute()
                    .sync();
            },
        ),
        step(a, "A parses s again with a syntax error", 1, |k| {
            k.parse("s", "SELEC 1").sync();
        }),
        step(a, "A parses s again on an undefined table", 1, |k| {
            k.parse("s", "SELECT * FROM no_such_table_here").sync();
        }),
        step(a, "A binds s: the first one", 1, |k| {
            k.bind("s", &["y"]).execute().sync();
        }),
        step(b, "B parses t, evicting A's s from the server", 1, |k| {
            k.parse("t", "SELECT 'B:' || $1::text").sync();
        }),
        step(a, "A parses s again, not on the server", 1, |k| {
            k.parse("s", "SELECT 'A4:' || $1::text").sync();
        }),
        step(b, "B parses t again", 1, |k| {
            k.parse("t", "SELECT 'B2:' || $1::text").sync();
        }),
        step(a, "A binds s", 1, |k| {
            k.bind("s", &["z"]).execute().sync();
        }),
        step(b, "B binds t", 1, |k| {
            k.bind("t", &["w"]).execute().sync();
        }),
        step(a, "A closes s and parses it anew", 1, |k| {
            k.close_stmt("s")
                .parse("s", "SELECT 'A5:' || $1::text")
                .bind("s", &["v"])
                .execute()
                .sync();
        }),
        step(a, "A parses u twice in one batch", 1, |k| {
            k.parse("u", "SELECT 1").parse("u", "SELECT 2").sync();
        }),
    ];
    for cap in ["1", "200"] {
        differential(&flags(cap), 2, &steps, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_parse_leaves_name_free() {
    let a = 0;
    let steps = [
        step(a, "A parses s on an undefined table", 1, |k| {
            k.parse("s", "SELECT * FROM no_such_table_here").sync();
        }),
        step(a, "A binds s", 1, |k| {
            k.bind("s", &[]).execute().sync();
        }),
        step(a, "A parses s", 1, |k| {
            k.parse("s", "SELECT 'ok:' || $1::text").sync();
        }),
        step(a, "A binds s", 1, |k| {
            k.bind("s", &["x"]).execute().sync();
        }),
        step(
            a,
            "in one write: a failing Parse of t, its Bind, again",
            3,
            |k| {
                k.parse("t", "SELEC 1")
                    .sync()
                    .bind("t", &[])
                    .execute()
                    .sync()
                    .parse("t", "SELECT 't:' || $1::text")
                    .bind("t", &["y"])
                    .execute()
                    .sync();
            },
        ),
        step(a, "A binds t", 1, |k| {
            k.bind("t", &["z"]).execute().sync();
        }),
        step(
            a,
            "in one write: a failing Parse of v, then v parsed",
            3,
            |k| {
                k.parse("v", "SELEC 1")
                    .sync()
                    .parse("v", "SELECT 'v:' || $1::text")
                    .sync()
                    .bind("v", &["w"])
                    .execute()
                    .sync();
            },
        ),
        step(a, "in one write: v parsed, then parsed again", 2, |k| {
            k.parse("v2", "SELECT 'v2:' || $1::text")
                .sync()
                .parse("v2", "SELECT 'v2b:' || $1::text")
                .bind("v2", &["w"])
                .execute()
                .sync();
        }),
    ];
    for cap in ["1", "200"] {
        differential(&flags(cap), 1, &steps, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_one_batch_keeps_statement_for_the_next() {
    let (a, b) = (0, 1);
    let steps = [
        step(a, "A parses s", 1, |k| {
            k.parse("s", "SELECT 'A:' || $1::text").sync();
        }),
        step(b, "B parses t, evicting A's s from the server", 1, |k| {
            k.parse("t", "SELECT 'B:' || $1::text").sync();
        }),
        step(
            a,
            "in one write: a failing batch binding s, then s bound",
            2,
            |k| {
                k.parse("", "SELECT * FROM no_such_table_here")
                    .bind("", &[])
                    .execute()
                    .bind("s", &["x"])
                    .execute()
                    .sync()
                    .bind("s", &["y"])
                    .execute()
                    .sync();
            },
        ),
        step(b, "B binds t", 1, |k| {
            k.bind("t", &["z"]).execute().sync();
        }),
        step(
            a,
            "in one write: three batches, the middle one failing",
            3,
            |k| {
                k.bind("s", &["1"])
                    .execute()
                    .sync()
                    .parse("", "SELECT * FROM no_such_table_here")
                    .bind("t2", &[])
                    .bind("s", &["2"])
                    .execute()
                    .sync()
                    .bind("s", &["3"])
                    .execute()
                    .sync();
            },
        ),
        step(a, "A binds s", 1, |k| {
            k.bind("s", &["4"]).execute().sync();
        }),
    ];
    for cap in ["1", "200"] {
        differential(&flags(cap), 2, &steps, true).await;
    }
}
