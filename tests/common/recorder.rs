//! A TCP relay between one test client and the proxy that records the protocol messages
//! passing each way (type, length, and the few fields that tell a story), so a client that
//! falls out of step can show what it was sent. Bytes are forwarded before they are parsed:
//! the relay adds one copy and no waiting.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Messages kept per direction.
const KEEP: usize = 40;
/// Bytes of a message body kept for its description; the rest is skipped unparsed.
const PEEK: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to proxy.
    Up,
    /// Proxy to client.
    Down,
}

struct Entry {
    seq: u64,
    at: Duration,
    dir: Dir,
    tag: u8,
    len: u32,
    detail: String,
}

#[derive(Default)]
struct Rings {
    seq: u64,
    up: VecDeque<Entry>,
    down: VecDeque<Entry>,
    events: Vec<(u64, Duration, String)>,
}

/// What one client connection saw, newest [`KEEP`] messages per direction.
pub struct Transcript {
    t0: Instant,
    /// The relay's own address towards the proxy: the `peer` in the proxy's log lines.
    proxy_side: Mutex<Option<SocketAddr>>,
    rings: Mutex<Rings>,
}

impl Transcript {
    fn new(t0: Instant) -> Transcript {
        Transcript {
            t0,
            proxy_side: Mutex::new(None),
            rings: Mutex::new(Rings::default()),
        }
    }

    pub fn proxy_side(&self) -> Option<SocketAddr> {
        *self.proxy_side.lock().unwrap()
    }

    fn push(&self, dir: Dir, tag: u8, len: u32, detail: String) {
        let at = self.t0.elapsed();
        let mut r = self.rings.lock().unwrap();
        r.seq += 1;
        let e = Entry {
            seq: r.seq,
            at,
            dir,
            tag,
            len,
            detail,
        };
        let ring = match dir {
            Dir::Up => &mut r.up,
            Dir::Down => &mut r.down,
        };
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    fn event(&self, what: String) {
        let at = self.t0.elapsed();
        let mut r = self.rings.lock().unwrap();
        r.seq += 1;
        let seq = r.seq;
        r.events.push((seq, at, what));
    }

    /// Both directions merged in the order the relay saw them, one line per message.
    pub fn render(&self) -> String {
        let r = self.rings.lock().unwrap();
        let mut lines: Vec<(u64, String)> = Vec::with_capacity(2 * KEEP);
        for e in r.up.iter().chain(r.down.iter()) {
            let arrow = match e.dir {
                Dir::Up => "C->P",
                Dir::Down => "P->C",
            };
            let tag = if e.tag == 0 { '-' } else { e.tag as char };
            lines.push((
                e.seq,
                format!(
                    "{:>9.3}s {arrow} {tag} len {:>5} {}",
                    e.at.as_secs_f64(),
                    e.len,
                    e.detail
                ),
            ));
        }
        for (seq, at, what) in &r.events {
            lines.push((*seq, format!("{:>9.3}s ---- {what}", at.as_secs_f64())));
        }
        lines.sort_by_key(|l| l.0);
        let mut out = String::new();
        for (_, l) in lines {
            let _ = writeln!(out, "    {l}");
        }
        out
    }
}

/// One listener; each accepted connection is relayed to `upstream` and recorded. The
/// transcript of the newest connection is the one [`Recorder::current`] returns, so a
/// test that opens its connections one after another through its own recorder always
/// knows which one is its.
pub struct Recorder {
    addr: SocketAddr,
    current: Arc<Mutex<Option<Arc<Transcript>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start(upstream: SocketAddr, t0: Instant) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder listener");
        let addr = listener.local_addr().expect("recorder address");
        let current: Arc<Mutex<Option<Arc<Transcript>>>> = Arc::default();
        let cur = current.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    res = listener.accept() => {
                        let Ok((client, _)) = res else { continue };
                        let t = Arc::new(Transcript::new(t0));
                        *cur.lock().unwrap() = Some(t.clone());
                        conns.spawn(relay(client, upstream, t));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Recorder {
            addr,
            current,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The newest connection's transcript.
    pub fn current(&self) -> Option<Arc<Transcript>> {
        self.current.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, t: Arc<Transcript>) {
    let Ok(mut proxy) = TcpStream::connect(upstream).await else {
        t.event("could not connect to the proxy".into());
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = proxy.set_nodelay(true);
    *t.proxy_side.lock().unwrap() = proxy.local_addr().ok();
    let (cr, cw) = client.split();
    let (pr, pw) = proxy.split();
    let up = pump(cr, pw, Dir::Up, &t);
    let down = pump(pr, cw, Dir::Down, &t);
    let (a, b) = tokio::join!(up, down);
    if a.is_err() || b.is_err() {
        // A reset on one side is passed on as a reset.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(&proxy).set_linger(Some(Duration::ZERO));
    }
}

async fn pump(
    mut r: tokio::net::tcp::ReadHalf<'_>,
    mut w: tokio::net::tcp::WriteHalf<'_>,
    dir: Dir,
    t: &Transcript,
) -> Result<(), ()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut parser = Parser::new(dir);
    let side = match dir {
        Dir::Up => "client",
        Dir::Down => "proxy",
    };
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                t.event(format!("{side} closed (EOF)"));
                let _ = w.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                t.event(format!("{side} read error: {e}"));
                let _ = w.shutdown().await;
                return Err(());
            }
        };
        if let Err(e) = w.write_all(&buf[..n]).await {
            t.event(format!(
                "write towards the other side of {side} failed: {e}"
            ));
            return Err(());
        }
        parser.feed(&buf[..n], t);
    }
}

/// Splits a byte stream into messages, keeping at most [`PEEK`] bytes of each body.
struct Parser {
    dir: Dir,
    /// The client's startup packet (no type byte) is still to come.
    startup: bool,
    head: Vec<u8>,
    body: Vec<u8>,
    /// Body bytes of the current message still to come (after the header).
    left: usize,
    in_msg: bool,
    tag: u8,
    len: u32,
}

impl Parser {
    fn new(dir: Dir) -> Parser {
        Parser {
            dir,
            startup: dir == Dir::Up,
            head: Vec::with_capacity(5),
            body: Vec::with_capacity(PEEK),
            left: 0,
            in_msg: false,
            tag: 0,
            len: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8], t: &Transcript) {
        while !data.is_empty() {
            if !self.in_msg {
                let hlen = if self.startup { 4 } else { 5 };
                let take = (hlen - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.head.len() < hlen {
                    return;
                }
                let (tag, l) = if self.startup {
                    (0, &self.head[0..4])
                } else {
                    (self.head[0], &self.head[1..5])
                };
                let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]);
                self.tag = tag;
                self.len = len;
                self.left = (len as usize).saturating_sub(4);
                self.in_msg = true;
                self.body.clear();
            }
            let take = self.left.min(data.len());
            let keep = take.min(PEEK.saturating_sub(self.body.len()));
            self.body.extend_from_slice(&data[..keep]);
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                self.finish(t);
            }
        }
    }

    fn finish(&mut self, t: &Transcript) {
        self.in_msg = false;
        self.head.clear();
        let detail = if self.startup {
            self.startup = false;
            let code = self
                .body
                .get(0..4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            match code {
                // The proxy's one-byte answer is not framed: what follows it in this
                // transcript is garbled (the soak's clients never ask for TLS).
                Some(80877103) | Some(80877104) => "SSLRequest/GSSENCRequest".into(),
                Some(80877102) => "CancelRequest".into(),
                _ => "startup".into(),
            }
        } else {
            describe(self.dir, self.tag, &self.body)
        };
        t.push(self.dir, self.tag, self.len, detail);
    }
}

fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(n) => (&b[..n], &b[n + 1..]),
        None => (b, &[]),
    }
}

fn lossy(b: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(max)]);
    s.replace('\n', " ")
}

/// The fields worth seeing of one message (`body`: its first [`PEEK`] bytes).
fn describe(dir: Dir, tag: u8, body: &[u8]) -> String {
    match (dir, tag) {
        (Dir::Down, b'E') | (Dir::Down, b'N') => {
            let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
            let mut rest = body;
            while let Some((&f, tail)) = rest.split_first() {
                if f == 0 {
                    break;
                }
                let (v, next) = cstr(tail);
                match f {
                    b'V' => sev = lossy(v, 16),
                    b'S' if sev.is_empty() => sev = lossy(v, 16),
                    b'C' => code = lossy(v, 8),
                    b'M' => msg = lossy(v, 100),
                    _ => {}
                }
                rest = next;
            }
            format!("{sev} {code} {msg}")
        }
        (Dir::Down, b'Z') => format!("status {}", body.first().map_or('?', |&b| b as char)),
        (Dir::Down, b'C') => lossy(cstr(body).0, 40),
        (Dir::Down, b'S') => {
            let (k, rest) = cstr(body);
            format!("{}={}", lossy(k, 40), lossy(cstr(rest).0, 40))
        }
        (Dir::Down, b'R') => format!(
            "auth {}",
            body.get(0..4)
                .map_or(-1, |c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        ),
        (Dir::Up, b'Q') => lossy(cstr(body).0, 60),
        (Dir::Up, b'P') => {
            let (name, rest) = cstr(body);
            format!("name {:?} {}", lossy(name, 30), lossy(cstr(rest).0, 50))
        }
        (Dir::Up, b'B') => {
            let (portal, rest) = cstr(body);
            format!(
                "portal {:?} statement {:?}",
                lossy(portal, 20),
                lossy(cstr(rest).0, 30)
            )
        }
        (Dir::Up, b'D') | (Dir::Up, b'C') => match body.split_first() {
            Some((&k, rest)) => format!("{} {:?}", k as char, lossy(cstr(rest).0, 30)),
            None => String::new(),
        },
        _ => String::new(),
    }
}
