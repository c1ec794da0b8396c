//! Prepared statements that must follow their client in transaction mode, checked against
//! PostgreSQL itself: every step runs once through pgsluice (several clients, one server
//! connection) and once on direct connections (one per client), and the two must answer
//! alike, message for message.
//!
//! - The unnamed statement lives until the next unnamed Parse or simple Query, so between
//!   a client's Parse and its Bind in a later batch another client's unnamed statement may
//!   be on the server: with the same parameter count that ran the other client's query.
//! - SQL `DEALLOCATE name` of a protocol-level statement (psycopg on cache eviction) must
//!   reach the server's name for it.
//! - `DISCARD ALL`/`DEALLOCATE ALL` after a comment or as a later statement of a query
//!   drop the statements of every client on that server, and must be noticed.

mod common;

use common::steps::{differential, step};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statement_stays_with_its_client() {
    let (a, b, c) = (0, 1, 2);
    let steps = [
        step(a, "A parses its unnamed statement", 1, |k| {
            k.parse("", "SELECT 'A:' || $1::text").sync();
        }),
        step(b, "B parses another, same parameter count", 1, |k| {
            k.parse("", "SELECT 'B:' || $1::text").sync();
        }),
        step(a, "A binds its own", 1, |k| {
            k.bind("", &["x"]).execute().sync();
        }),
        step(c, "C parses one with two parameters", 1, |k| {
            k.parse("", "SELECT $1::int + $2::int").sync();
        }),
        step(a, "A binds again: one parameter", 1, |k| {
            k.bind("", &["y"]).execute().sync();
        }),
        step(a, "A describes its own", 1, |k| {
            k.describe_stmt("").sync();
        }),
        step(
            a,
            "A's simple query destroys its unnamed statement",
            1,
            |k| {
                k.query("SELECT 1");
            },
        ),
        step(b, "B parses again", 1, |k| {
            k.parse("", "SELECT 'B2'").sync();
        }),
        step(a, "A binds a statement it no longer has", 1, |k| {
            k.bind("", &[]).execute().sync();
        }),
        step(a, "A describes a statement it no longer has", 1, |k| {
            k.describe_stmt("").sync();
        }),
        step(a, "same batch: parse, bind, bind", 1, |k| {
            k.parse("", "SELECT 'A3:' || $1::text")
                .bind("", &["1"])
                .execute()
                .bind("", &["2"])
                .execute()
                .sync();
        }),
        step(a, "pipelined: parse, sync, bind, sync", 2, |k| {
            k.parse("", "SELECT 'A4'")
                .sync()
                .bind("", &[])
                .execute()
                .sync();
        }),
        step(c, "C binds its two-parameter statement", 1, |k| {
            k.bind("", &["2", "3"]).execute().sync();
        }),
        step(a, "inside a transaction", 3, |k| {
            k.query("BEGIN")
                .parse("", "SELECT 'A5:' || $1::text")
                .sync()
                .bind("", &["z"])
                .execute()
                .sync();
        }),
        step(a, "a later batch of the transaction", 2, |k| {
            k.bind("", &["w"]).execute().sync().query("COMMIT");
        }),
        step(b, "B's statement failed to parse", 1, |k| {
            k.parse("", "SELEC 1").sync();
        }),
        step(b, "B binds after its failed Parse", 1, |k| {
            k.bind("", &[]).execute().sync();
        }),
        step(a, "A closes its unnamed statement", 1, |k| {
            k.close_stmt("").sync();
        }),
        step(c, "C parses again", 1, |k| {
            k.parse("", "SELECT 'C2'").sync();
        }),
        step(a, "A binds after closing it", 1, |k| {
            k.bind("", &[]).execute().sync();
        }),
    ];
    for cap in ["200", "0"] {
        differential(
            &[
                "--pool-mode",
                "transaction",
                "--pool-size",
                "1",
                "--max-prepared-statements",
                cap,
            ],
            3,
            &steps,
            false,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_deallocate_and_discard_act_on_client_names() {
    let (p, q, r) = (0, 1, 2);
    let steps = [
        step(p, "P prepares s1, s2", 1, |k| {
            k.parse("s1", "SELECT 'P1'")
                .parse("s2", "SELECT 'P2'")
                .sync();
        }),
        step(p, "DEALLOCATE s1", 1, |k| {
            k.query("DEALLOCATE s1");
        }),
        step(p, "bind s1 after it", 1, |k| {
            k.bind("s1", &[]).execute().sync();
        }),
        step(p, "bind s2", 1, |k| {
            k.bind("s2", &[]).execute().sync();
        }),
        step(r, "R prepares r1", 1, |k| {
            k.parse("r1", "SELECT 'R1'").sync();
        }),
        step(
            q,
            "Q prepares q1: P's s2 is evicted from the server",
            1,
            |k| {
                k.parse("q1", "SELECT 'Q1'").sync();
            },
        ),
        step(p, "DEALLOCATE PREPARE s2 (not on the server)", 1, |k| {
            k.query("DEALLOCATE PREPARE s2");
        }),
        step(p, "bind s2 after it", 1, |k| {
            k.bind("s2", &[]).execute().sync();
        }),
        step(p, "quoted name after a comment", 3, |k| {
            k.parse("S3", "SELECT 'P3'")
                .sync()
                .query("/* c */ DEALLOCATE \"S3\";")
                .bind("S3", &[])
                .execute()
                .sync();
        }),
        step(p, "P prepares s5", 1, |k| {
            k.parse("s5", "SELECT 'P5'").sync();
        }),
        step(r, "R prepares r5: P's s5 is evicted", 1, |k| {
            k.parse("r5", "SELECT 'R5'").sync();
        }),
        step(q, "Q prepares q5", 1, |k| {
            k.parse("q5", "SELECT 'Q5'").sync();
        }),
        step(
            p,
            "extended-protocol DEALLOCATE (psycopg's pipeline mode)",
            1,
            |k| {
                k.parse("", "DEALLOCATE s5").bind("", &[]).execute().sync();
            },
        ),
        step(p, "bind s5 after it", 1, |k| {
            k.bind("s5", &[]).execute().sync();
        }),
        step(p, "DEALLOCATE of an unknown name", 1, |k| {
            k.query("DEALLOCATE nosuch");
        }),
        step(p, "P prepares s4 and fails a transaction", 3, |k| {
            k.parse("s4", "SELECT 'P4'")
                .sync()
                .query("BEGIN")
                .query("SELECT 1/0");
        }),
        // Awaited on its own: a Bind pipelined after it is rewritten before the outcome.
        step(p, "DEALLOCATE in a failed transaction", 1, |k| {
            k.query("DEALLOCATE s4");
        }),
        step(p, "s4 is still there after ROLLBACK", 2, |k| {
            k.query("ROLLBACK").bind("s4", &[]).execute().sync();
        }),
    ];
    differential(
        &[
            "--pool-mode",
            "transaction",
            "--pool-size",
            "1",
            "--max-prepared-statements",
            "2",
        ],
        3,
        &steps,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_after_a_comment_or_as_a_later_statement() {
    let (q, r) = (0, 1);
    let steps = [
        step(r, "R prepares r1", 1, |k| {
            k.parse("r1", "SELECT 'R1'").sync();
        }),
        step(q, "Q prepares q1", 1, |k| {
            k.parse("q1", "SELECT 'Q1'").sync();
        }),
        step(r, "R prepares r2", 1, |k| {
            k.parse("r2", "SELECT 'R2'").sync();
        }),
        step(q, "DISCARD ALL after a comment", 1, |k| {
            k.query("/* c */ DISCARD ALL");
        }),
        step(r, "R binds r2", 1, |k| {
            k.bind("r2", &[]).execute().sync();
        }),
        step(q, "Q binds q1 after its DISCARD ALL", 1, |k| {
            k.bind("q1", &[]).execute().sync();
        }),
        step(
            q,
            "Q prepares q2; DISCARD ALL as a second statement",
            2,
            |k| {
                k.parse("q2", "SELECT 'Q2'")
                    .sync()
                    .query("SELECT 1; DISCARD ALL");
            },
        ),
        step(q, "Q binds q2", 1, |k| {
            k.bind("q2", &[]).execute().sync();
        }),
        step(r, "R prepares r3", 1, |k| {
            k.parse("r3", "SELECT 'R3'").sync();
        }),
        step(
            q,
            "Q prepares q3; DEALLOCATE ALL as a second statement",
            2,
            |k| {
                k.parse("q3", "SELECT 'Q3'")
                    .sync()
                    .query("SELECT 1; DEALLOCATE ALL");
            },
        ),
        step(q, "Q binds q3", 1, |k| {
            k.bind("q3", &[]).execute().sync();
        }),
        step(r, "R binds r3 and r1", 1, |k| {
            k.bind("r3", &[]).execute().bind("r1", &[]).execute().sync();
        }),
        step(r, "R prepares r4", 1, |k| {
            k.parse("r4", "SELECT 'R4'").sync();
        }),
        step(
            q,
            "DEALLOCATE ALL past the first 8 KiB of a query",
            1,
            |k| {
                k.query(&format!("SELECT '{}'; DEALLOCATE ALL", "x".repeat(9000)));
            },
        ),
        step(r, "R binds r4", 1, |k| {
            k.bind("r4", &[]).execute().sync();
        }),
        step(r, "DISCARD ALL in a transaction fails", 3, |k| {
            k.query("BEGIN").query("DISCARD ALL").query("ROLLBACK");
        }),
        step(r, "R binds r3", 1, |k| {
            k.bind("r3", &[]).execute().sync();
        }),
    ];
    differential(
        &["--pool-mode", "transaction", "--pool-size", "1"],
        2,
        &steps,
        false,
    )
    .await;
}
