//! The proxy resends a batch whose fresh server connection turned out dead, but only when
//! the server certainly never read it. A backend can run a batch, commit it, and die with
//! its answer still in its output buffer (kill -9, a crash): the proxy then sees the
//! connection close without a byte, as from a backend that died idle. Resending that batch
//! would run it twice.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cluster, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A relay to PostgreSQL whose connections, once armed, lose the answer to the proxy's next
/// batch: the backend runs it to its ReadyForQuery, then the connection closes without a
/// byte of that answer, as when the backend dies before flushing its output. What a backend
/// flushes before it reads on gets through: a Sync at the front of the batch is passed on
/// alone and its ReadyForQuery delivered before the rest is sent (PostgreSQL answers a
/// Sync, flushing, before it reads the next message).
struct AnswerLoss {
    addr: SocketAddr,
    generation: Arc<AtomicU64>,
}

impl AnswerLoss {
    async fn start(upstream: SocketAddr) -> AnswerLoss {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let generation = Arc::new(AtomicU64::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                tokio::spawn(relay(c, upstream, g.clone()));
            }
        });
        AnswerLoss { addr, generation }
    }

    /// Connections open now lose their next answer; later ones work.
    fn arm(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn relay(mut c: TcpStream, upstream: SocketAddr, g: Arc<AtomicU64>) {
    let born = g.load(Ordering::SeqCst);
    let Ok(mut u) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cb, mut ub) = (vec![0u8; 16384], vec![0u8; 16384]);
    loop {
        tokio::select! {
            r = c.read(&mut cb) => {
                let Ok(n @ 1..) = r else { return };
                if g.load(Ordering::SeqCst) > born {
                    lose_answer(&mut c, &mut u, &cb[..n]).await;
                    return;
                }
                if u.write_all(&cb[..n]).await.is_err() { return; }
            }
            r = u.read(&mut ub) => {
                let Ok(n @ 1..) = r else { return };
                if c.write_all(&ub[..n]).await.is_err() { return; }
            }
        }
    }
}

/// Runs `batch` on the backend; only the answer to a leading Sync reaches the proxy.
async fn lose_answer(c: &mut TcpStream, u: &mut TcpStream, mut batch: &[u8]) {
    const SYNC: &[u8] = &[b'S', 0, 0, 0, 4];
    if batch.starts_with(SYNC) {
        if u.write_all(SYNC).await.is_err() {
            return;
        }
        let Some(z) = read_to_ready(u).await else {
            return;
        };
        let _ = c.write_all(&z).await;
        batch = &batch[SYNC.len()..];
    }
    if !batch.is_empty() && u.write_all(batch).await.is_ok() {
        // The batch has run to its end (committed) once its ReadyForQuery is out.
        let _ = read_to_ready(u).await;
    }
    // Dropping both sockets: the proxy sees EOF without a byte of the answer.
}

/// Server messages up to and including the next ReadyForQuery (5 s at most).
async fn read_to_ready(u: &mut TcpStream) -> Option<Vec<u8>> {
    let read = async {
        let mut got = Vec::new();
        let mut at = 0;
        let mut buf = [0u8; 4096];
        for _ in 0..10_000 {
            while got.len() >= at + 5 {
                let len = u32::from_be_bytes([got[at + 1], got[at + 2], got[at + 3], got[at + 4]]);
                let end = at + 1 + len as usize;
                if got.len() < end {
                    break;
                }
                if got[at] == b'Z' {
                    got.truncate(end);
                    return Some(got);
                }
                at = end;
            }
            let n = u.read(&mut buf).await.ok().filter(|&n| n > 0)?;
            got.extend_from_slice(&buf[..n]);
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

async fn count(pg: &common::TempPostgres) -> String {
    let out = pg.psql(&["-At", "-c", "SELECT count(*) FROM t"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_run_by_a_server_that_died_unheard_is_not_resent() {
    let pg = cluster().await;
    let out = pg.psql(&["-c", "CREATE TABLE t(n int)"]);
    assert!(out.status.success(), "{out:?}");
    let relay = AnswerLoss::start(pg.addr()).await;
    let upstream = format!("postgres://postgres@{}/postgres", relay.addr);
    for mode in ["transaction", "session"] {
        let proxy = TestProxy::start_upstream(
            &upstream,
            &[
                "--pool-mode",
                mode,
                "--pool-size",
                "2",
                "--breaker-threshold",
                "100",
            ],
        )
        .await;
        // Transaction mode: one idle pooled connection, checked out fresh by the INSERT.
        // Session mode: the client's own connection, its first batch.
        if mode == "transaction" {
            let warm = proxy.client().await;
            warm.simple_query("SELECT 1").await.unwrap();
            drop(warm);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let c = proxy.client().await;
        let before = count(&pg).await;
        relay.arm();
        let r = c.simple_query("INSERT INTO t VALUES (1)").await;
        let after = count(&pg).await;
        let before: i64 = before.parse().unwrap();
        assert_eq!(
            after,
            (before + 1).to_string(),
            "{mode}: the INSERT ran {} times (client got {:?})",
            after.parse::<i64>().unwrap_or(-1) - before,
            r.as_ref().map(|_| "success")
        );
        let e = r.expect_err("the answer was lost: the client must get an error");
        assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{mode}: {e}");
        proxy.shutdown().await;
    }
}
