//! A COPY FROM STDIN over the extended protocol that the proxy answers itself must leave
//! the client in step. tokio-postgres sends `Bind, Execute, Sync`, waits for CopyInResponse,
//! then sends the data and `CopyDone, Sync` (or `CopyFail, Sync` when the COPY did not
//! start); a server in copy-in mode ignores the first Sync, so the COPY gets one
//! ReadyForQuery. Both cases below used to answer it twice; the client took the second
//! answer as the answer to its next request ("unexpected message from server" in the soak).

mod common;

use std::time::Duration;

use common::{FaultShim, TempPostgres, TestProxy};
use futures::SinkExt;

async fn setup() -> TempPostgres {
    let pg = common::cluster().await;
    let out = pg.psql(&["-c", "CREATE TABLE t(n int)"]);
    assert!(out.status.success(), "{out:?}");
    pg
}

/// The client's next simple query gets its own answer, and the connection is still open.
async fn in_step(c: &tokio_postgres::Client, n: i32) {
    let sql = format!("SELECT {n}");
    let rows = tokio::time::timeout(Duration::from_secs(10), c.simple_query(&sql))
        .await
        .expect("no answer within 10 s")
        .unwrap_or_else(|e| panic!("{sql} after the failed COPY: {e}"));
    let got: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(got, [n.to_string()], "{sql} got another request's answer");
}

/// Soak transcript: the COPY's `Bind, Execute, Sync` was shed (53400) after its prepare had
/// run; tokio-postgres then sent `CopyFail, Sync`, which the proxy ran as a batch of its own,
/// and its ReadyForQuery answered the client's next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_copy_start_leaves_the_client_in_step() {
    let pg = setup().await;
    let proxy = TestProxy::start(
        &pg,
        &[
            "--pool-size",
            "1",
            "--queue-timeout",
            "300ms",
            "--codel-interval",
            "0",
        ],
    )
    .await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    let copy = b.prepare("COPY t(n) FROM STDIN").await.unwrap();
    // A's open transaction keeps the only server connection: B's COPY waits, then is shed.
    a.batch_execute("BEGIN").await.unwrap();
    let err = match b.copy_in::<_, bytes::Bytes>(&copy).await {
        Ok(_) => panic!("the COPY started although the only server connection was taken"),
        Err(e) => e,
    };
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("53400"),
        "COPY start: {err}"
    );
    // The CopyFail and Sync tokio-postgres sent then were shed too and answered after
    // another queue timeout; let that pass, then free the server.
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.batch_execute("COMMIT").await.unwrap();
    in_step(&b, 7).await;
    // The statement still works, and a COPY that runs inserts its rows.
    let sink = b.copy_in::<_, bytes::Bytes>(&copy).await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    in_step(&b, 8).await;
    in_step(&a, 9).await;
    proxy.shutdown().await;
}

/// The server is lost after CopyInResponse, while the client is sending its data: the
/// proxy answered the COPY with an error and ReadyForQuery at once, then ran the client's
/// `CopyDone, Sync` on a new server, whose ReadyForQuery was one answer too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lost_mid_copy_in_leaves_the_client_in_step() {
    let pg = setup().await;
    let shim = FaultShim::start(pg.addr()).await;
    let upstream = format!("postgres://postgres@{}/postgres", shim.addr());
    let proxy = TestProxy::start_upstream(
        &upstream,
        &[
            "--pool-size",
            "2",
            "--breaker-threshold",
            "100",
            "--codel-interval",
            "0",
        ],
    )
    .await;
    let c = proxy.client().await;
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY t(n) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n")).await.unwrap();
    // Every server connection is reset while the COPY waits for more data.
    shim.cut_all_wait().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = sink.send(bytes::Bytes::from_static(b"2\n")).await;
    let err = sink.finish().await.expect_err("the COPY's server was lost");
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err}");
    // An extra ReadyForQuery would arrive now and be taken as the next request's answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_step(&c, 5).await;
    in_step(&c, 6).await;
    let out = pg.psql(&["-At", "-c", "SELECT count(*) FROM t"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "a COPY whose server was lost must not have committed"
    );
    proxy.shutdown().await;
}
