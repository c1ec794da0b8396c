//! A client that leaves in the middle of `COPY FROM STDIN` must not leave its backend in
//! COPY: a backend waiting for COPY data ignores a cancel, so it held its transaction and
//! its locks until the connection was closed. Both pool modes, COPY started by a simple
//! Query and by an extended-protocol Execute (with the Sync drivers send before the data).

mod common;

use std::time::{Duration, Instant};

use common::raw::{errors, rows, Got, RawClient};
use common::{cluster, TestProxy};

/// Backends other than `direct`'s own that are running a COPY into t, and locks on t.
async fn copy_state(direct: &tokio_postgres::Client) -> (i64, i64) {
    let r = direct
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_activity
                     WHERE pid <> pg_backend_pid() AND state <> 'idle'
                       AND query ILIKE 'COPY t %'),
                    (SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass)",
            &[],
        )
        .await
        .expect("read pg_stat_activity");
    (r.get(0), r.get(1))
}

async fn leave_during_copy(proxy: &TestProxy, direct: &tokio_postgres::Client, extended: bool) {
    let what = format!("{}, extended {extended}", proxy.addr());
    let mut a = RawClient::connect(proxy.addr()).await;
    if extended {
        a.parse("", "COPY t (n) FROM STDIN")
            .bind("", &[])
            .execute()
            .sync();
    } else {
        a.query("COPY t (n) FROM STDIN");
    }
    a.send().await;
    let got = a.until(|g| matches!(g, Got::CopyIn | Got::Ready(_))).await;
    assert_eq!(got.last(), Some(&Got::CopyIn), "{what}: {got:?}");
    a.copy_data(b"1\n2\n3\n").send().await;
    // Let the data reach the backend, so that it is inside the COPY with rows pending.
    let t0 = Instant::now();
    while copy_state(direct).await.0 == 0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        copy_state(direct).await,
        (0, 0),
        "{what}: COPY never started"
    );
    drop(a);

    let t0 = Instant::now();
    let mut state = copy_state(direct).await;
    while state != (0, 0) && t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = copy_state(direct).await;
    }
    assert_eq!(
        state,
        (0, 0),
        "{what}: 3 s after the client left, (backends in COPY, locks on t)"
    );
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "{what}: rows of an abandoned COPY were committed");

    // The next client (one server connection: the same one, or a new one) works.
    let mut b = RawClient::connect(proxy.addr()).await;
    let got = b
        .query("INSERT INTO t VALUES (7); SELECT count(*) FROM t")
        .roundtrip()
        .await;
    assert!(errors(&got).is_empty(), "{what}: next client: {got:?}");
    assert_eq!(rows(&got), ["1"], "{what}: next client: {got:?}");
    assert_eq!(got.last(), Some(&Got::Ready(b'I')), "{what}: {got:?}");
    let got = b.query("DELETE FROM t").roundtrip().await;
    assert!(errors(&got).is_empty(), "{what}: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_copy_ends_the_copy_upstream() {
    let pg = cluster().await;
    pg.psql(&["-c", "CREATE TABLE t(n int)"]);
    let direct = pg.client().await;
    for mode in ["transaction", "session"] {
        // A long cancel-grace: ending the COPY must not wait for it to run out.
        let proxy = TestProxy::start(
            &pg,
            &[
                "--pool-mode",
                mode,
                "--pool-size",
                "1",
                "--cancel-grace",
                "30s",
            ],
        )
        .await;
        for extended in [false, true] {
            leave_during_copy(&proxy, &direct, extended).await;
        }
        proxy.shutdown().await;
    }
}
