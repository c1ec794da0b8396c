//! tokio-postgres sends `Bind, Execute, Sync` and only then the COPY data, `CopyDone, Sync`.
//! PostgreSQL ignores a Sync received in copy-in mode, so the two Syncs get one
//! ReadyForQuery. Counting one answer per Sync kept the proxy waiting for the second: the
//! server connection and its slot stayed attached to the client after the COPY, and a lost
//! server then answered the client one batch too many.

mod common;

use std::time::Duration;

use common::{connect, TempPostgres, TestProxy};
use futures::SinkExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_is_released_after_a_pipelined_copy_in() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    pg.psql(&["-c", "CREATE TABLE t(n int)"]);
    let proxy = TestProxy::start(
        &pg,
        &[
            "--pool-size",
            "1",
            "--queue-timeout",
            "2s",
            "--codel-interval",
            "0",
        ],
    )
    .await;
    let a = proxy.client().await;
    let sink = a
        .copy_in::<_, bytes::Bytes>("COPY t(n) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 3);
    a.simple_query("SELECT 1").await.unwrap();

    // With one server connection, a second client only runs once A has given it back.
    let b = connect(&proxy.url()).await;
    let r = tokio::time::timeout(Duration::from_secs(5), b.simple_query("SELECT 1")).await;
    let pools = proxy.http_get("/pools").await.1;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("second client refused while A is idle: {e}; /pools {pools}"),
        Err(_) => panic!("second client hung while A is idle; /pools {pools}"),
    }
    drop((a, b));
    proxy.shutdown().await;
}
