//! Runs the proxy in-process, pointed at a throwaway cluster.

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pg::{client_program, connect, TempPostgres};

pub struct TestProxy {
    handle: Option<pgsluice::server::ProxyHandle>,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
}

impl TestProxy {
    /// Starts a proxy on loopback ports chosen by the OS, upstream = `pg`, plus `extra_flags`.
    pub async fn start(pg: &TempPostgres, extra_flags: &[&str]) -> TestProxy {
        Self::start_upstream(&pg.url(), extra_flags).await
    }

    /// Same, with an explicit upstream URL (e.g. through a fault shim).
    pub async fn start_upstream(upstream: &str, extra_flags: &[&str]) -> TestProxy {
        // For diagnosis: `PGSLUICE_LOG=debug` shows the in-process proxy's log with the test's.
        if let Ok(filter) = std::env::var("PGSLUICE_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let mut args: Vec<&str> = vec![
            "pgsluice",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
        ];
        args.extend_from_slice(extra_flags);
        let cfg = match pgsluice::config::Config::from_args(args) {
            Ok(cfg) => cfg,
            Err(e) => panic!("proxy config rejected: {e:#}"),
        };
        let handle = match pgsluice::server::start(cfg).await {
            Ok(h) => h,
            Err(e) => panic!("proxy failed to start: {e:#}"),
        };
        let addr = handle.addr();
        let admin = handle.admin_addr();
        TestProxy {
            handle: Some(handle),
            addr,
            admin,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("proxy has no admin listener")
    }

    /// URL for the postgres superuser through the proxy.
    pub fn url(&self) -> String {
        self.url_for("postgres", "postgres")
    }

    /// The proxy URL with an `application_name` (the client identity the guard sees).
    pub fn url_with_app(&self, app: &str) -> String {
        format!("{}&application_name={app}", self.url())
    }

    pub fn url_for(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@{}/{db}?connect_timeout=10", self.addr)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// psql (no psqlrc, stop on error) through the proxy.
    pub fn psql(&self, args: &[&str]) -> Output {
        Command::new(client_program("psql"))
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-d", "postgres"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.admin_addr(), "GET", path).await
    }

    pub async fn http_post(&self, path: &str) -> (u16, String) {
        http_request(self.admin_addr(), "POST", path).await
    }

    /// Graceful stop; dropping without it leaves the proxy to die with the test runtime.
    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close), enough for the admin endpoints.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => panic!("{method} {path}: {e}"),
        Err(_) => panic!("{method} {path}: no response within 10s"),
    };
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {path}: malformed response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // Each chunk: hex size line, data, CRLF; a zero size ends the body.
    for _ in 0..1_000_000 {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
    None
}
