//! TLS on both sides against a real PostgreSQL, with certificates generated per test:
//! psql through pgsluice with libpq's sslmodes, `--tls-mode require`, mutual TLS, clear
//! errors for wrong certificates, certificate reload, large and pipelined results over TLS,
//! upstream TLS in each sslmode, and SCRAM-SHA-256-PLUS upstream.

#[path = "tls/client.rs"]
mod client;
mod common;
#[path = "tls/pki.rs"]
mod pki;

use std::time::Duration;

use client::{ok, psql, stderr, stdout, tls_client, tls_connect};
use common::{cluster, try_connect, HostAuth, TempPostgres, TestProxy};
use pki::{write, Ca, Leaf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

const LIMIT: Duration = Duration::from_secs(30);

/// The error of a connect that must fail.
fn refused(
    r: Result<tokio_postgres::Client, tokio_postgres::Error>,
    what: &str,
) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("{what}"),
        Err(e) => e,
    }
}

/// The server's message of a failed connect (tokio-postgres displays only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// A proxy with a server certificate from `ca` for 127.0.0.1 and localhost.
struct TlsSetup {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_path: String,
}

impl TlsSetup {
    fn new() -> TlsSetup {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new("pgsluice test CA");
        let ca_path = write(dir.path(), "ca.pem", &ca.pem()).display().to_string();
        TlsSetup { dir, ca, ca_path }
    }

    /// Writes `leaf` as NAME.crt/NAME.key; returns both paths.
    fn leaf_files(&self, name: &str, leaf: &Leaf) -> (String, String) {
        let c = write(self.dir.path(), &format!("{name}.crt"), &leaf.cert_pem);
        let k = write(self.dir.path(), &format!("{name}.key"), &leaf.key_pem);
        (c.display().to_string(), k.display().to_string())
    }

    /// Server certificate files for the proxy.
    fn proxy_cert(&self) -> (String, String) {
        self.leaf_files("proxy", &self.ca.server(&["127.0.0.1", "localhost"]))
    }
}

async fn proxy_with_tls(pg: &TempPostgres, cert: &(String, String), extra: &[&str]) -> TestProxy {
    let mut flags = vec!["--tls-cert", cert.0.as_str(), "--tls-key", cert.1.as_str()];
    flags.extend_from_slice(extra);
    TestProxy::start(pg, &flags).await
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_require_and_verify_full_through_the_proxy() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let proxy = proxy_with_tls(&pg, &t.proxy_cert(), &[]).await;
    let o = psql(proxy.port(), "sslmode=require", "\\conninfo").await;
    assert!(ok(&o).contains("SSL connection"), "{}", stdout(&o));
    let verify = format!("sslmode=verify-full sslrootcert={}", t.ca_path);
    let o = psql(proxy.port(), &verify, "SELECT 40 + 2").await;
    assert_eq!(ok(&o).trim(), "42");
    // The default tls-mode with a certificate is allow: plaintext still works.
    let o = psql(proxy.port(), "sslmode=disable", "\\conninfo").await;
    assert!(!ok(&o).contains("SSL connection"), "{}", stdout(&o));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_certificate_tls_is_declined() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &[]).await;
    let o = psql(proxy.port(), "sslmode=require", "SELECT 1").await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("server does not support SSL"),
        "{}",
        stderr(&o)
    );
    let o = psql(proxy.port(), "sslmode=prefer", "SELECT 1").await;
    assert_eq!(ok(&o).trim(), "1");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn require_mode_refuses_plaintext_with_28000() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let proxy = proxy_with_tls(&pg, &t.proxy_cert(), &["--tls-mode", "require"]).await;
    let err = match try_connect(&proxy.url()).await {
        Ok(_) => panic!("a plaintext client was accepted under --tls-mode require"),
        Err(e) => e,
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert!(
        db_message(&err).contains("pgsluice: TLS is required"),
        "{err:?}"
    );
    let o = psql(proxy.port(), "sslmode=disable", "SELECT 1").await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("pgsluice: TLS is required"),
        "{}",
        stderr(&o)
    );
    let o = psql(proxy.port(), "sslmode=require", "SELECT 1").await;
    assert_eq!(ok(&o).trim(), "1");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_accepts_a_good_client_certificate_only() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let client_ca = Ca::new("client CA");
    let client_ca_path = write(t.dir.path(), "client-ca.pem", &client_ca.pem());
    let proxy = proxy_with_tls(
        &pg,
        &t.proxy_cert(),
        &[
            "--tls-mode",
            "require",
            "--tls-client-ca",
            client_ca_path.to_str().unwrap(),
        ],
    )
    .await;
    let good = t.leaf_files("good", &client_ca.client("app"));
    let conn = format!("sslmode=require sslcert={} sslkey={}", good.0, good.1);
    let o = psql(proxy.port(), &conn, "SELECT 'in'").await;
    assert_eq!(ok(&o).trim(), "in");

    let o = psql(proxy.port(), "sslmode=require", "SELECT 'in'").await;
    assert!(!o.status.success(), "no client certificate was accepted");
    assert!(!stdout(&o).contains("in"));

    // Signed by the server's CA, which is not the client CA.
    let foreign = t.leaf_files("foreign", &t.ca.client("app"));
    let conn = format!("sslmode=require sslcert={} sslkey={}", foreign.0, foreign.1);
    let o = psql(proxy.port(), &conn, "SELECT 'in'").await;
    assert!(
        !o.status.success(),
        "a foreign client certificate was accepted"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_certificate_is_a_clear_client_error() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    // A certificate for another host name.
    let other_name = t.leaf_files("other", &t.ca.server(&["db.example.com"]));
    let proxy = proxy_with_tls(&pg, &other_name, &[]).await;
    let verify = format!("sslmode=verify-full sslrootcert={}", t.ca_path);
    let o = psql(proxy.port(), &verify, "SELECT 1").await;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("db.example.com") && e.contains("does not match host name"),
        "{e}"
    );
    proxy.shutdown().await;

    // A certificate from a CA the client does not trust.
    let stranger = Ca::new("stranger CA");
    let foreign = t.leaf_files("foreign", &stranger.server(&["127.0.0.1"]));
    let proxy = proxy_with_tls(&pg, &foreign, &[]).await;
    let o = psql(proxy.port(), &verify, "SELECT 1").await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("certificate verify failed"),
        "{}",
        stderr(&o)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tls_files_are_refused_at_start() {
    let t = TlsSetup::new();
    let cfg = |cert: &str, key: &str| {
        pgsluice::config::Config::from_args([
            "pgsluice",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
        .expect("flags parse")
    };
    let (c1, k1) = t.proxy_cert();
    let (_, k2) = t.leaf_files("second", &t.ca.server(&["127.0.0.1"]));
    let missing = t.dir.path().join("missing.pem").display().to_string();
    for (cert, key, expect) in [
        (missing.as_str(), k1.as_str(), "cannot read"),
        (c1.as_str(), missing.as_str(), "cannot read"),
        (c1.as_str(), k2.as_str(), "does not match the certificate"),
        (k1.as_str(), k1.as_str(), "no PEM certificate"),
    ] {
        let e = match pgsluice::server::start(cfg(cert, key)).await {
            Ok(_) => panic!("started with --tls-cert {cert} --tls-key {key}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(expect), "expected {expect:?} in: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn negotiation_edge_cases_close_cleanly() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let proxy = proxy_with_tls(&pg, &t.proxy_cert(), &[]).await;
    let ca = t.ca.pem();
    let bounded = |what: &'static str| {
        move |r: Result<std::io::Result<usize>, tokio::time::error::Elapsed>| match r {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("{what}: {n} bytes instead of a close"),
            Err(_) => panic!("{what}: the proxy neither answered nor closed"),
        }
    };

    // GSSENCRequest is declined even with TLS configured; SSLRequest then gets 'S'.
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut gss = client::ssl_request();
    gss[4..].copy_from_slice(&80_877_104i32.to_be_bytes());
    s.write_all(&gss).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'N');
    s.write_all(&client::ssl_request()).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'S');
    // Garbage instead of a ClientHello.
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    // rustls may answer with an alert before closing; then the next read is the close.
    if let Ok(Ok(n)) = r {
        if n > 0 {
            assert_eq!(buf[0], 0x15, "not a TLS alert: {:?}", &buf[..n]);
            bounded("garbage handshake")(
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
            );
        }
    } else {
        bounded("garbage handshake")(r);
    }

    // An SSLRequest inside TLS.
    let mut tls = tls_connect(proxy.addr(), &ca).await;
    tls.write_all(&client::ssl_request()).await.unwrap();
    tls.flush().await.unwrap();
    bounded("SSLRequest inside TLS")(
        tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await,
    );

    // The proxy still serves.
    let c = tls_client(proxy.addr(), &ca).await;
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_reread_on_reload() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let cert = t.proxy_cert();
    let proxy = proxy_with_tls(&pg, &cert, &[]).await;
    let verify_with = |ca: String| format!("sslmode=verify-full sslrootcert={ca}");
    let o = psql(proxy.port(), &verify_with(t.ca_path.clone()), "SELECT 1").await;
    assert_eq!(ok(&o).trim(), "1");
    // A client connected before the reload keeps its session.
    let before = tls_client(proxy.addr(), &t.ca.pem()).await;

    let next_ca = Ca::new("next CA");
    let next_ca_path = write(t.dir.path(), "next-ca.pem", &next_ca.pem());
    let next = next_ca.server(&["127.0.0.1"]);
    std::fs::write(&cert.0, &next.cert_pem).unwrap();
    std::fs::write(&cert.1, &next.key_pem).unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    let new_verify = verify_with(next_ca_path.display().to_string());
    let o = psql(proxy.port(), &new_verify, "SELECT 2").await;
    assert_eq!(ok(&o).trim(), "2");
    let o = psql(proxy.port(), &verify_with(t.ca_path.clone()), "SELECT 1").await;
    assert!(!o.status.success(), "the old certificate is still served");
    let v: i32 = before.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(v, 3);

    // A broken key file: the reload is refused, says why, and the new certificate stays.
    std::fs::write(&cert.1, "not a key\n").unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("--tls-key"), "{body}");
    // A key of another certificate.
    std::fs::write(&cert.1, &t.ca.server(&["127.0.0.1"]).key_pem).unwrap();
    let (status, body) = proxy.http_post("/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("does not match"), "{body}");
    let o = psql(proxy.port(), &new_verify, "SELECT 4").await;
    assert_eq!(ok(&o).trim(), "4");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_pipelined_and_copy_traffic_does_not_stall_over_tls() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let proxy = proxy_with_tls(&pg, &t.proxy_cert(), &[]).await;

    let o = psql(
        proxy.port(),
        "sslmode=require",
        "SELECT repeat('x', 1000000)",
    )
    .await;
    let out = ok(&o);
    assert_eq!(out.trim_end().len(), 1_000_000);
    assert!(out.trim_end().bytes().all(|b| b == b'x'));
    let o = psql(
        proxy.port(),
        "sslmode=require",
        "SELECT generate_series(1, 100000)",
    )
    .await;
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 100_000);
    assert_eq!(lines.last().copied(), Some("100000"));

    let c = tls_client(proxy.addr(), &t.ca.pem()).await;
    // Pipelined: tokio-postgres sends all of these before reading any answer.
    let queries = (0..200i32).map(|i| {
        let c = &c;
        async move {
            let row = c
                .query_one("SELECT $1::int, repeat('y', 20000)", &[&i])
                .await
                .expect("pipelined query");
            (row.get::<_, i32>(0), row.get::<_, String>(1).len())
        }
    });
    let got = tokio::time::timeout(LIMIT, futures::future::join_all(queries))
        .await
        .expect("pipelined queries stalled over TLS");
    for (i, (v, len)) in got.into_iter().enumerate() {
        assert_eq!((v, len), (i as i32, 20_000));
    }

    // COPY out and in.
    let copy = async {
        use futures::{SinkExt, StreamExt};
        let out = c
            .copy_out("COPY (SELECT generate_series(1, 100000)) TO STDOUT")
            .await
            .expect("copy out");
        futures::pin_mut!(out);
        let mut lines = 0usize;
        while let Some(chunk) = out.next().await {
            lines += chunk
                .expect("copy chunk")
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
        }
        assert_eq!(lines, 100_000);
        c.batch_execute("BEGIN; CREATE TEMP TABLE sink (x int) ON COMMIT DROP")
            .await
            .expect("temp table");
        let sink = c.copy_in("COPY sink FROM STDIN").await.expect("copy in");
        futures::pin_mut!(sink);
        for chunk in 0..50 {
            let text: String = (0..1000)
                .map(|i| format!("{}\n", chunk * 1000 + i))
                .collect();
            sink.send(bytes::Bytes::from(text))
                .await
                .expect("copy data");
        }
        assert_eq!(sink.finish().await.expect("copy finish"), 50_000);
        let n: i64 = c
            .query_one("SELECT count(*) FROM sink", &[])
            .await
            .unwrap()
            .get(0);
        c.batch_execute("COMMIT").await.unwrap();
        n
    };
    let n = tokio::time::timeout(LIMIT, copy)
        .await
        .expect("COPY stalled over TLS");
    assert_eq!(n, 50_000);
    proxy.shutdown().await;
}

/// Reads until the stream's last bytes are ReadyForQuery(idle), `pause` between reads so
/// the proxy's socket stays full; returns the byte count.
async fn read_to_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S, pause: Duration) -> usize {
    const READY: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await.expect("read from proxy");
        assert!(n > 0, "proxy closed the connection");
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > READY.len() {
            tail.drain(..tail.len() - READY.len());
        }
        if tail == READY {
            return total;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_gets_the_end_of_large_results_over_tls() {
    let pg = cluster().await;
    let t = TlsSetup::new();
    let proxy = proxy_with_tls(&pg, &t.proxy_cert(), &[]).await;
    let mut s = client::tls_connect_small_window(proxy.addr(), &t.ca.pem()).await;
    let mut b = bytes::BytesMut::new();
    pgsluice::protocol::startup_message(&mut b, &[("user", "postgres"), ("database", "postgres")]);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::timeout(LIMIT, read_to_ready(&mut s, Duration::ZERO))
        .await
        .expect("no ReadyForQuery after startup");
    for round in 0..5 {
        let mut q = bytes::BytesMut::new();
        pgsluice::protocol::query(&mut q, "SELECT repeat('x', 2000000)");
        s.write_all(&q).await.unwrap();
        s.flush().await.unwrap();
        // Let the proxy's socket fill up, then drain it slowly: TLS output the proxy
        // accepted but did not flush would never arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = tokio::time::timeout(LIMIT, read_to_ready(&mut s, Duration::from_millis(1)))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the end of the result never arrived"));
        assert!(n > 2_000_000, "round {round}: {n} bytes");
    }
    proxy.shutdown().await;
}

/// A cluster with `ssl=on`, the given certificate, and TLS required of TCP clients.
async fn ssl_cluster(leaf: Leaf, auth: Option<(HostAuth, &str)>) -> TempPostgres {
    let auth = auth.map(|(a, p)| (a, p.to_string()));
    tokio::task::spawn_blocking(move || {
        let mut b = TempPostgres::builder()
            .setting("ssl", "on")
            .setting("ssl_cert_file", "server.crt")
            .setting("ssl_key_file", "server.key")
            .data_file("server.crt", leaf.cert_pem)
            .data_file("server.key", leaf.key_pem)
            .hostssl_only();
        if let Some((a, p)) = auth {
            b = b.host_auth(a, &p);
        }
        b.spawn()
    })
    .await
    .expect("start ssl cluster")
}

#[path = "tls/upstream.rs"]
mod upstream;
