//! Connection floods against the in-process proxy: thousands of idle clients, the client
//! connection cap, and slow (slowloris) startups, while real clients keep querying.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{connect, TempPostgres, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a stack-owned struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn startup_packet() -> BytesMut {
    let mut b = BytesMut::new();
    pgsluice::protocol::startup_message(&mut b, &[("user", "postgres"), ("database", "postgres")]);
    b
}

/// Reads backend messages until ReadyForQuery (Ok) or an ErrorResponse (Err(code, message)).
async fn read_until_ready(s: &mut TcpStream) -> Result<(), (String, String)> {
    loop {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr)
            .await
            .map_err(|e| ("io".into(), e.to_string()))?;
        let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body)
            .await
            .map_err(|e| ("io".into(), e.to_string()))?;
        match hdr[0] {
            b'Z' => return Ok(()),
            b'E' => {
                let f = pgsluice::protocol::parse_error_fields(&body);
                return Err((f.code, f.message));
            }
            _ => {}
        }
    }
}

/// Opens a connection and completes startup (trust auth) with the raw protocol.
async fn raw_client(addr: std::net::SocketAddr) -> Result<TcpStream, (String, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| ("connect".into(), e.to_string()))?;
    s.write_all(&startup_packet())
        .await
        .map_err(|e| ("io".into(), e.to_string()))?;
    read_until_ready(&mut s).await?;
    Ok(s)
}

static SHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Real clients looping `SELECT 1` until stopped; returns every latency seen.
fn spawn_served(
    url: String,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Duration>>> {
    (0..n)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = connect(&url).await;
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) && lat.len() < 100_000 {
                    let t = Instant::now();
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), c.simple_query("SELECT 1"))
                            .await
                            .expect("served client stalled for 5s");
                    match r {
                        Ok(_) => lat.push(t.elapsed()),
                        // 5 clients on 4 slots: the standing-queue rule may shed (never ran).
                        Err(e) if e.code().map(|c| c.code()) == Some("53400") => {
                            SHED.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("served client query failed: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                lat
            })
        })
        .collect()
}

async fn collect_p99(handles: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> (usize, Duration) {
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    let p99 = all[(all.len() * 99 / 100).min(all.len() - 1)];
    (all.len(), p99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_idle_clients_while_served_clients_run() {
    let limit = raise_nofile();
    let n: usize = if limit >= 25_000 { 10_000 } else { 2_000 };
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--max-client-conn", "20000"]).await;
    // First login caches the server's parameters; warm it before measuring.
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let rss_before = rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let served = spawn_served(proxy.url(), 5, stop.clone());
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    let addr = proxy.addr();
    // Batches keep the listen backlog from overflowing on a small machine.
    for batch in 0..n.div_ceil(500) {
        let size = 500.min(n - batch * 500);
        let conns = futures::future::join_all((0..size).map(|_| raw_client(addr))).await;
        for c in conns {
            held.push(c.unwrap_or_else(|e| panic!("flood client refused: {e:?}")));
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "flood too slow: {} connections in {:?}",
            held.len(),
            started.elapsed()
        );
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_held = rss_kib();
    stop.store(true, Ordering::Relaxed);
    let (queries, p99) = collect_p99(served).await;
    eprintln!(
        "flood: {} connections held (startup done) in {took:?}; RSS {rss_before} KiB -> {rss_held} KiB; \
         served clients: {queries} queries, p99 {p99:?}, {} shed with 53400",
        held.len(),
        SHED.load(Ordering::Relaxed)
    );
    assert_eq!(held.len(), n);
    assert!(queries > 50, "served clients starved: {queries} queries");
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
    drop(held);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_excess_with_53300() {
    raise_nofile();
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "2", "--max-client-conn", "100"]).await;
    let addr = proxy.addr();
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(raw_client(addr).await.expect("within the cap"));
    }
    let mut refused = 0;
    for _ in 0..20 {
        let (code, msg) = raw_client(addr).await.expect_err("over the cap");
        assert_eq!(code, "53300", "{msg}");
        assert!(msg.starts_with("pgsluice: too many clients"), "{msg}");
        refused += 1;
    }
    // A freed slot is usable again.
    held.pop();
    let start = Instant::now();
    loop {
        match raw_client(addr).await {
            Ok(s) => {
                held.push(s);
                break;
            }
            Err((code, _)) if code == "53300" && start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("slot not freed: {e:?}"),
        }
    }
    eprintln!("cap 100: held {}, refused {refused} with 53300", held.len());
    drop(held);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_startups_are_dropped() {
    raise_nofile();
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(&pg, &["--pool-size", "4", "--startup-timeout", "1s"]).await;
    let addr = proxy.addr();
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let served = spawn_served(proxy.url(), 3, stop.clone());

    let packet = startup_packet();
    let slow: Vec<_> = (0..200)
        .map(|_| {
            let packet = packet.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let t = Instant::now();
                for &b in packet.iter() {
                    if s.write_all(&[b]).await.is_err() {
                        return t.elapsed();
                    }
                    // A closed socket shows up as EOF/reset on a short read.
                    let mut one = [0u8; 256];
                    if let Ok(r) =
                        tokio::time::timeout(Duration::from_millis(200), s.read(&mut one)).await
                    {
                        match r {
                            Ok(0) | Err(_) => return t.elapsed(),
                            Ok(_) => {}
                        }
                    }
                    if t.elapsed() > Duration::from_secs(6) {
                        break;
                    }
                }
                t.elapsed() + Duration::from_secs(3600)
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for h in slow {
        let took = h.await.unwrap();
        assert!(
            took < Duration::from_millis(2500),
            "slow client kept for {took:?}"
        );
        worst = worst.max(took);
    }
    stop.store(true, Ordering::Relaxed);
    let (queries, p99) = collect_p99(served).await;
    eprintln!(
        "slowloris: 200 dropped, latest after {worst:?}; served {queries} queries, p99 {p99:?}"
    );
    assert!(queries > 20, "served clients starved");
    proxy.shutdown().await;
}
