//! Server connections that die while idle (pg_terminate_backend, idle_session_timeout, an
//! upstream restart, a link that breaks unnoticed) must never cost a client a query: a new
//! or existing client gets the right answer and nothing else. In session mode an idle client
//! gets its server's asynchronous messages (NOTIFY, termination) when they happen.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cluster, connect, TempPostgres, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::SimpleQueryMessage;

const MODES: [&str; 2] = ["transaction", "session"];

/// A protocol-level client: every message the proxy sends is seen, nothing is hidden.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

type Msg = (u8, Vec<u8>);

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect proxy");
        let mut r = Raw { s, buf: Vec::new() };
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for kv in ["user", "postgres", "database", "postgres"] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        r.s.write_all(&pkt).await.unwrap();
        let msgs = r.until_ready().await;
        assert!(
            !msgs.iter().any(|m| m.0 == b'E'),
            "startup failed: {msgs:?}"
        );
        r
    }

    /// The next message, or None at EOF; panics when nothing comes within 10 s.
    async fn next(&mut self) -> Option<Msg> {
        for _ in 0..100_000 {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + len.max(4) as usize;
                if self.buf.len() >= total {
                    let m: Vec<u8> = self.buf.drain(..total).collect();
                    return Some((m[0], m[5..].to_vec()));
                }
            }
            let mut tmp = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut tmp))
                .await
                .expect("proxy answered within 10s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
        panic!("message loop bound reached");
    }

    async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            match self.next().await {
                Some(m) => {
                    let z = m.0 == b'Z';
                    out.push(m);
                    if z {
                        return out;
                    }
                }
                None => panic!("connection closed; got {}", show(&out)),
            }
        }
        panic!("no ReadyForQuery")
    }

    /// Runs a simple query; asserts one row with `want`, no error, then ReadyForQuery.
    async fn expect_value(&mut self, sql: &str, want: &str) {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.s.write_all(&q).await.unwrap();
        let msgs = self.until_ready().await;
        let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"TDCZ", "{sql}: got {}", show(&msgs));
        let d = &msgs[1].1;
        // DataRow: column count (2), then length (4) and value.
        assert_eq!(&d[6..], want.as_bytes(), "{sql}: got {}", show(&msgs));
        self.assert_silent(Duration::from_millis(300)).await;
    }

    /// Nothing arrives within `d` (a stray message would put the client out of step).
    async fn assert_silent(&mut self, d: Duration) {
        assert!(self.buf.is_empty(), "stray bytes: {:?}", self.buf);
        let mut tmp = [0u8; 256];
        if let Ok(r) = tokio::time::timeout(d, self.s.read(&mut tmp)).await {
            let n = r.unwrap_or(0);
            panic!("unexpected {n} bytes from proxy: {:?}", &tmp[..n]);
        }
    }
}

fn show(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|(t, b)| format!("{}:{}", *t as char, String::from_utf8_lossy(b)))
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = tokio::time::timeout(Duration::from_secs(10), c.simple_query(sql))
        .await
        .expect("answered")
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// Terminates every client backend but the asking one; returns how many.
async fn terminate_all(pg: &TempPostgres) -> i64 {
    let d = pg.client().await;
    let n: i64 = d
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    n
}

async fn proxy(pg: &TempPostgres, mode: &str) -> TestProxy {
    TestProxy::start(
        pg,
        &[
            "--pool-mode",
            mode,
            "--pool-size",
            "3",
            // One stale connection counted as an upstream failure would open the circuit.
            "--breaker-threshold",
            "1",
            "--breaker-cooldown",
            "5s",
        ],
    )
    .await
}

/// Fills the pool with `n` idle server connections (clients that ran a query and left).
async fn warm(proxy: &TestProxy, n: usize) {
    let mut cs = Vec::new();
    for _ in 0..n {
        let c = proxy.client().await;
        c.batch_execute("BEGIN").await.unwrap();
        cs.push(c);
    }
    for c in &cs {
        c.batch_execute("COMMIT").await.unwrap();
    }
    drop(cs);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// New clients, a client that was already connected (transaction mode) and psql all get
/// the right answers after every pooled backend was terminated.
async fn check_after(proxy: &TestProxy, mode: &str, existing: Option<&mut Raw>) {
    if let Some(e) = existing {
        e.expect_value("SELECT 20", "20").await;
        e.expect_value("SELECT 21", "21").await;
    }
    for i in 0..4 {
        let mut b = Raw::connect(proxy.addr()).await;
        b.expect_value(&format!("SELECT {i}"), &i.to_string()).await;
        b.expect_value("SELECT 'again'", "again").await;
    }
    let c = proxy.client().await;
    assert_eq!(value(&c, "SELECT 7").await, "7", "{mode}");
    drop(c);
    let out = proxy.psql(&["-At", "-c", "SELECT 8"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "8",
        "{mode}: psql: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_backends_are_never_handed_out() {
    let pg = cluster().await;
    for mode in MODES {
        let proxy = proxy(&pg, mode).await;
        warm(&proxy, 3).await;
        // Transaction mode: an existing client holds no server while idle.
        let mut existing = match mode {
            "transaction" => Some(Raw::connect(proxy.addr()).await),
            _ => None,
        };
        let killed = terminate_all(&pg).await;
        assert!(killed >= 3, "{mode}: terminated {killed}");
        check_after(&proxy, mode, existing.as_mut()).await;
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_closes_are_not_failures() {
    let pg = common::cluster_with(&[("idle_session_timeout", "400ms")]).await;
    for mode in MODES {
        let proxy = proxy(&pg, mode).await;
        warm(&proxy, 3).await;
        let mut existing = match mode {
            "transaction" => Some(Raw::connect(proxy.addr()).await),
            _ => None,
        };
        tokio::time::sleep(Duration::from_millis(900)).await;
        check_after(&proxy, mode, existing.as_mut()).await;
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_leaves_no_stale_connection() {
    let pg = Arc::new(cluster().await);
    for mode in MODES {
        let proxy = proxy(&pg, mode).await;
        warm(&proxy, 3).await;
        let mut existing = match mode {
            "transaction" => Some(Raw::connect(proxy.addr()).await),
            _ => None,
        };
        let p = pg.clone();
        tokio::task::spawn_blocking(move || p.restart())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        check_after(&proxy, mode, existing.as_mut()).await;
        proxy.shutdown().await;
    }
}

/// A relay whose connections, once armed, die on the proxy's next byte (optionally after
/// a FATAL as a terminated backend sends): a server lost after the checkout check passed.
struct Trapdoor {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Trapdoor {
    async fn start(upstream: SocketAddr, fatal: bool) -> Trapdoor {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a, g) = (armed.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let (a, g) = (a.clone(), g.clone());
                tokio::spawn(async move {
                    let born = g.load(Ordering::SeqCst);
                    let Ok(mut u) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cb, mut ub) = ([0u8; 16384], [0u8; 16384]);
                    loop {
                        tokio::select! {
                            r = c.read(&mut cb) => {
                                let Ok(n @ 1..) = r else { return };
                                if a.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) > born {
                                    if fatal {
                                        let _ = c.write_all(&fatal_57p01()).await;
                                    }
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
                });
            }
        });
        Trapdoor {
            addr,
            armed,
            generation,
        }
    }

    /// Connections open now die on their next byte from the proxy; later ones work.
    fn arm(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }
}

fn fatal_57p01() -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (b'M', "terminating connection due to administrator command"),
    ] {
        body.push(k);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = vec![b'E'];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_on_a_connection_lost_unnoticed_is_retried() {
    let pg = cluster().await;
    for fatal in [false, true] {
        for mode in MODES {
            let trap = Trapdoor::start(pg.addr(), fatal).await;
            let url = format!("postgres://postgres@{}/postgres", trap.addr);
            let proxy = TestProxy::start_upstream(
                &url,
                &[
                    "--pool-mode",
                    mode,
                    "--pool-size",
                    "3",
                    "--breaker-threshold",
                    "1",
                    "--breaker-cooldown",
                    "5s",
                ],
            )
            .await;
            warm(&proxy, 3).await;
            let mut existing = match mode {
                "transaction" => Some(Raw::connect(proxy.addr()).await),
                _ => None,
            };
            trap.arm();
            let what = format!("{mode}, fatal={fatal}");
            if let Some(e) = existing.as_mut() {
                e.expect_value("SELECT 20", "20").await;
            }
            for i in 0..4 {
                let mut b = Raw::connect(proxy.addr()).await;
                b.expect_value(&format!("SELECT {i}"), &i.to_string()).await;
            }
            // Extended protocol through tokio-postgres, with a named statement.
            let c = proxy.client().await;
            let st = c.prepare("SELECT $1::int + 1").await.expect(&what);
            let v: i32 = c.query_one(&st, &[&41]).await.expect(&what).get(0);
            assert_eq!(v, 42, "{what}");
            proxy.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_idle_client_gets_notifications_at_once() {
    let pg = cluster().await;
    let proxy = proxy(&pg, "session").await;
    let mut l = Raw::connect(proxy.addr()).await;
    l.expect_value("SELECT 'listening' FROM (SELECT 1) s", "listening")
        .await;
    let mut q = Vec::new();
    let sql = "LISTEN ch";
    q.push(b'Q');
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    l.s.write_all(&q).await.unwrap();
    l.until_ready().await;
    let d = pg.client().await;
    d.batch_execute("NOTIFY ch, 'hello'").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), l.next())
        .await
        .expect("NotificationResponse while idle")
        .expect("connection open");
    assert_eq!(m.0, b'A', "got {}", show(std::slice::from_ref(&m)));
    assert!(String::from_utf8_lossy(&m.1).contains("hello"));
    l.assert_silent(Duration::from_millis(200)).await;
    // The session goes on in step.
    l.expect_value("SELECT 5", "5").await;
    d.batch_execute("NOTIFY ch, 'again'").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), l.next())
        .await
        .expect("second notification")
        .expect("open");
    assert_eq!(m.0, b'A');
    l.expect_value("SELECT 6", "6").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_sees_its_server_terminated_and_is_disconnected() {
    let pg = cluster().await;
    // Session mode, and transaction mode idle inside a transaction (server attached).
    for (mode, begin) in [("session", false), ("transaction", true)] {
        let proxy = proxy(&pg, mode).await;
        let mut s = Raw::connect(proxy.addr()).await;
        if begin {
            let sql = "BEGIN";
            let mut q = vec![b'Q'];
            q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
            q.extend_from_slice(sql.as_bytes());
            q.push(0);
            s.s.write_all(&q).await.unwrap();
            s.until_ready().await;
        }
        s.expect_value("SELECT 1", "1").await;
        terminate_all(&pg).await;
        let m = tokio::time::timeout(Duration::from_secs(3), s.next())
            .await
            .unwrap_or_else(|_| panic!("{mode}: FATAL while idle"))
            .expect("FATAL before close");
        assert_eq!(m.0, b'E', "{mode}: got {}", show(std::slice::from_ref(&m)));
        let text = String::from_utf8_lossy(&m.1).to_string();
        assert!(
            text.contains("FATAL") && text.contains("57P01"),
            "{mode}: {text}"
        );
        let after = tokio::time::timeout(Duration::from_secs(3), s.next())
            .await
            .expect("closed after the FATAL");
        assert!(after.is_none(), "{mode}: after FATAL got {after:?}");
        // The proxy itself is fine and the circuit is closed.
        let c = connect(&proxy.url()).await;
        assert_eq!(value(&c, "SELECT 9").await, "9", "{mode}");
        proxy.shutdown().await;
    }
}

/// The first batch on a connection that turns out dead defines a prepared statement (how
/// tokio-postgres starts `prepare`, `execute` with SQL text, `copy_in`): its resend must
/// define it afresh, not find the name taken by the dead server's rewrite (42P05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_batch_defines_its_statements_again() {
    let pg = cluster().await;
    for fatal in [false, true] {
        let trap = Trapdoor::start(pg.addr(), fatal).await;
        let url = format!("postgres://postgres@{}/postgres", trap.addr);
        let proxy =
            TestProxy::start_upstream(&url, &["--pool-mode", "transaction", "--pool-size", "3"])
                .await;
        warm(&proxy, 3).await;
        let c = proxy.client().await;
        trap.arm();
        let what = format!("fatal={fatal}");
        // Every pooled connection is dead: the prepare's batch is resent until it reaches
        // a new one, each time rewritten anew.
        let st = c
            .prepare("SELECT $1::int + 1")
            .await
            .unwrap_or_else(|e| panic!("{what}: prepare on a resent batch: {e:?}"));
        let v: i32 = c.query_one(&st, &[&41]).await.expect(&what).get(0);
        assert_eq!(v, 42, "{what}");
        let v: i32 = c
            .query_one("SELECT $1::int * 2", &[&21])
            .await
            .expect(&what)
            .get(0);
        assert_eq!(v, 42, "{what}");
        proxy.shutdown().await;
    }
}
