//! A TCP relay that injects network faults between a client and an upstream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Per-direction relay buffer; data beyond it waits in kernel socket buffers.
const CHUNK: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything at once.
    Pass,
    /// Hold each chunk this long before forwarding it.
    Delay(Duration),
    /// Stop reading in both directions; sockets stay open.
    Stall,
    /// New connections are accepted but never connected upstream; existing ones stall.
    Blackhole,
}

impl Mode {
    fn forwards(self) -> bool {
        matches!(self, Mode::Pass | Mode::Delay(_))
    }
}

pub struct FaultShim {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    cut: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultShim {
    /// Listens on 127.0.0.1:0 and relays each accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultShim {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind shim listener");
        let addr = listener.local_addr().expect("shim local addr");
        let (mode, _) = watch::channel(Mode::Pass);
        let (cut, _) = watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let ctx = Ctx {
            upstream,
            mode: mode.clone(),
            cut: cut.clone(),
            open: open.clone(),
        };
        let accepted2 = accepted.clone();
        let task = tokio::spawn(async move {
            // Owning the JoinSet here means aborting this task aborts every connection too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    res = listener.accept() => {
                        let Ok((client, _)) = res else { continue };
                        accepted2.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(ctx.clone().serve(client));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FaultShim {
            addr,
            mode,
            cut,
            open,
            accepted,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Resets (RST) every connection open right now; later connections are unaffected.
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Cuts every current connection and waits (up to 2 s) until they are all gone, so
    /// nothing sent afterwards can still slip through.
    pub async fn cut_all_wait(&self) {
        self.cut_all();
        let start = std::time::Instant::now();
        while self.connections() > 0 && start.elapsed() < std::time::Duration::from_secs(2) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Connections currently open through the shim.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Ctx {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    cut: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ctx {
    async fn serve(self, mut client: TcpStream) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let _guard = OpenGuard(self.open.clone());
        let mut cut = self.cut.subscribe();
        cut.mark_unchanged();

        if *self.mode.borrow() == Mode::Blackhole {
            // Answer nothing until cut; bytes sent are swallowed, and a client that gives up
            // and closes takes the socket with it (so the shim holds no stale descriptors).
            let mut sink = [0u8; 1024];
            let mut client = client;
            loop {
                tokio::select! {
                    _ = cut.changed() => { reset(&client); return; }
                    r = tokio::io::AsyncReadExt::read(&mut client, &mut sink) => {
                        if !matches!(r, Ok(n) if n > 0) {
                            return;
                        }
                    }
                }
            }
        }
        let mut server = tokio::select! {
            res = TcpStream::connect(self.upstream) => match res {
                Ok(s) => s,
                Err(_) => { reset(&client); return; }
            },
            _ = cut.changed() => { reset(&client); return; }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let cut_now = {
            let (cr, cw) = client.split();
            let (sr, sw) = server.split();
            let up = pump(cr, sw, self.mode.subscribe());
            let down = pump(sr, cw, self.mode.subscribe());
            tokio::select! {
                _ = async { tokio::join!(up, down) } => false,
                _ = cut.changed() => true,
            }
        };
        if cut_now {
            reset(&client);
            reset(&server);
        }
    }
}

/// SO_LINGER 0 makes the coming close send RST instead of FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn pump(
    mut r: tokio::net::tcp::ReadHalf<'_>,
    mut w: tokio::net::tcp::WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if mode.wait_for(|m| m.forwards()).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let current = *mode.borrow();
        if let Mode::Delay(d) = current {
            tokio::time::sleep(d).await;
        }
        // A chunk read just before a stall is held back until forwarding resumes.
        if mode.wait_for(|m| m.forwards()).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
