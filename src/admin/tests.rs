//! The admin server over a real loopback socket, driven by a minimal HTTP/1.1 client.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

#[derive(Default)]
struct FakeBackend {
    ready: AtomicBool,
    paused: AtomicBool,
    upstream_calls: AtomicUsize,
    reloads: AtomicUsize,
    reload_error: Mutex<Option<String>>,
}

impl AdminBackend for FakeBackend {
    fn pools(&self) -> serde_json::Value {
        json!([{ "pool": "app/app", "active": 2, "limit": 20 }])
    }
    fn upstream_ready(&self) -> bool {
        self.upstream_calls.fetch_add(1, Ordering::SeqCst);
        self.ready.load(Ordering::SeqCst)
    }
    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
    fn reload(&self) -> Result<(), String> {
        self.reloads.fetch_add(1, Ordering::SeqCst);
        match self.reload_error.lock().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Server {
    addr: SocketAddr,
    backend: Arc<FakeBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(token: Option<&str>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let backend = Arc::new(FakeBackend::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let cfg = AdminConfig {
            token: token.map(str::to_string),
        };
        let task = tokio::spawn(serve(
            listener,
            backend.clone(),
            crate::metrics::install(),
            cfg,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            backend,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let joined = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        assert!(
            matches!(joined, Ok(Ok(Ok(())))),
            "server did not stop cleanly"
        );
    }

    async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, None).await
    }

    async fn post(&self, path: &str, bearer: Option<&str>) -> Reply {
        request(self.addr, "POST", path, bearer).await
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, bearer: Option<&str>) -> Reply {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .expect("admin request timed out")
        .expect("admin request failed");
    let text = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("reply has a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "test client reads only sized bodies: {head}"
    );
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

#[tokio::test]
async fn healthz_is_ok_even_when_not_ready_and_never_asks_the_upstream() {
    let srv = Server::start(None).await;
    srv.backend.paused.store(true, Ordering::SeqCst);
    let r = srv.get("/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "ok");
    assert_eq!(srv.backend.upstream_calls.load(Ordering::SeqCst), 0);
    srv.shutdown().await;
}

#[tokio::test]
async fn readyz_follows_upstream_and_pause() {
    let srv = Server::start(None).await;
    let r = srv.get("/readyz").await;
    assert_eq!((r.status, r.body.trim()), (503, "upstream down"));

    srv.backend.ready.store(true, Ordering::SeqCst);
    let r = srv.get("/readyz").await;
    assert_eq!((r.status, r.body.trim()), (200, "ready"));

    assert_eq!(srv.post("/pause", None).await.status, 200);
    let r = srv.get("/readyz").await;
    assert_eq!((r.status, r.body.trim()), (503, "paused"));

    assert_eq!(srv.post("/resume", None).await.status, 200);
    assert_eq!(srv.get("/readyz").await.status, 200);

    srv.backend.ready.store(false, Ordering::SeqCst);
    assert_eq!(srv.get("/readyz").await.status, 503);
    srv.shutdown().await;
}

#[tokio::test]
async fn pause_and_resume_toggle_from_loopback_without_token() {
    let srv = Server::start(None).await;
    let r = srv.post("/pause", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "paused": true }));
    assert!(srv.backend.paused.load(Ordering::SeqCst));
    // Pausing twice is harmless.
    assert_eq!(
        srv.post("/pause", None).await.json(),
        json!({ "paused": true })
    );

    let r = srv.post("/resume", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "paused": false }));
    assert!(!srv.backend.paused.load(Ordering::SeqCst));
    srv.shutdown().await;
}

#[tokio::test]
async fn token_is_required_from_loopback_when_configured() {
    let srv = Server::start(Some("t0ken")).await;
    for path in ["/pause", "/resume", "/reload"] {
        let r = srv.post(path, None).await;
        assert_eq!(r.status, 401, "{path} without token: {r:?}");
        assert!(r
            .head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"));
        assert_eq!(srv.post(path, Some("wrong")).await.status, 401, "{path}");
    }
    assert!(!srv.backend.paused.load(Ordering::SeqCst));
    assert_eq!(srv.backend.reloads.load(Ordering::SeqCst), 0);

    let r = srv.post("/pause", Some("t0ken")).await;
    assert_eq!((r.status, r.json()), (200, json!({ "paused": true })));
    let r = srv.post("/resume", Some("t0ken")).await;
    assert_eq!((r.status, r.json()), (200, json!({ "paused": false })));
    // Read-only routes need no token.
    assert_eq!(srv.get("/pools").await.status, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn reload_reports_success_and_failure() {
    let srv = Server::start(None).await;
    let r = srv.post("/reload", None).await;
    assert_eq!((r.status, r.json()), (200, json!({ "reloaded": true })));

    *srv.backend.reload_error.lock() = Some("bad max_active".to_string());
    let r = srv.post("/reload", None).await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json(),
        json!({ "reloaded": false, "error": "bad max_active" })
    );
    assert_eq!(srv.backend.reloads.load(Ordering::SeqCst), 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn pools_metrics_and_unknown_paths() {
    let srv = Server::start(None).await;
    let r = srv.get("/pools").await;
    assert_eq!(r.status, 200);
    assert!(r
        .head
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    assert_eq!(r.json()[0]["pool"], "app/app");

    metrics::counter!(crate::metrics::SHED_TOTAL, "pool" => "admin_test/app", "reason" => "queue_full")
        .increment(2);
    let r = srv.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    assert!(
        r.body
            .contains("pgsluice_shed_total{pool=\"admin_test/app\",reason=\"queue_full\"} 2"),
        "{}",
        r.body
    );

    assert_eq!(srv.get("/nope").await.status, 404);
    assert_eq!(srv.get("/pause").await.status, 405);
    assert!(!srv.backend.paused.load(Ordering::SeqCst));
    srv.shutdown().await;
}
