//! Clients that speak TLS to the proxy: psql with libpq's sslmode options, and
//! tokio-postgres over a rustls stream (it is not TLS-capable without extra crates, but it
//! runs its protocol over any stream).

use crate::common::pg::client_program;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// psql -At with a libpq connection string of `conninfo` to the proxy at `port`.
pub async fn psql(port: u16, conninfo: &str, sql: &str) -> Output {
    let conn = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10 {conninfo}"
    );
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        Command::new(client_program("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(sql)
            .arg(conn)
            // No user files (~/.postgresql/root.crt and the like) may change the outcome.
            .env("HOME", "/nonexistent")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    })
    .await
    .expect("psql task")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts psql succeeded and returns its output.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "psql failed ({}): {}",
        o.status,
        stderr(o)
    );
    stdout(o)
}

pub fn ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8i32.to_be_bytes());
    b[4..].copy_from_slice(&80_877_103i32.to_be_bytes());
    b
}

/// SSLRequest, 'S', then a rustls handshake trusting `ca_pem`.
pub async fn tls_connect(addr: SocketAddr, ca_pem: &str) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect proxy");
    tls_handshake(tcp, ca_pem).await
}

/// Like [`tls_connect`] with a small socket receive buffer, so the proxy's writes meet a
/// full socket often.
pub async fn tls_connect_small_window(addr: SocketAddr, ca_pem: &str) -> TlsStream<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = sock.connect(addr).await.expect("connect proxy");
    tls_handshake(tcp, ca_pem).await
}

async fn tls_handshake(mut tcp: TcpStream, ca_pem: &str) -> TlsStream<TcpStream> {
    tcp.write_all(&ssl_request())
        .await
        .expect("send SSLRequest");
    assert_eq!(tcp.read_u8().await.expect("SSLRequest answer"), b'S');
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA pem")).expect("add CA");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(pgsluice::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake")
}

/// A tokio-postgres client over TLS to the proxy.
pub async fn tls_client(addr: SocketAddr, ca_pem: &str) -> tokio_postgres::Client {
    let stream = tls_connect(addr, ca_pem).await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("postgres")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, conn) = cfg
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .expect("startup over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
