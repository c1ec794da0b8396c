//! A raw PostgreSQL frontend. Drivers hide the exact message order; the tester needs to send
//! precisely the sequences that stress a pooler (several Syncs in one write, an unnamed
//! statement parsed in one batch and bound in the next, COPY through the extended protocol)
//! and to see every message that comes back. Each connection keeps a transcript of its last
//! messages for failure reports.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Lines of transcript kept per connection.
const TRANSCRIPT: usize = 48;
/// Longest transcript line; message bodies of MBs are summarized.
const LINE: usize = 160;

/// An ErrorResponse or NoticeResponse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub hint: String,
}

impl Fields {
    /// The SQLSTATE with a short reason, for the refusal tally: the guard's reason from its
    /// hint ("standing queue"), else the end of the message.
    pub fn label(&self) -> String {
        let reason = match (self.hint.rfind('('), self.hint.rfind(')')) {
            (Some(a), Some(b)) if a < b => &self.hint[a + 1..b],
            _ => {
                let m = self.message.trim_start_matches("pgsluice: ");
                m.rsplit(": ").next().unwrap_or(m)
            }
        };
        let reason: String = reason.chars().take(40).collect();
        format!("{} {reason}", self.code)
    }
}

/// A backend message, decoded as far as the oracle needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    EmptyQuery,
    PortalSuspended,
    ParamDesc(usize),
    RowDesc(usize),
    Row(Vec<Option<Bytes>>),
    Complete(String),
    Error(Fields),
    Notice(Fields),
    CopyIn,
    CopyOut,
    CopyData(Bytes),
    CopyDone,
    Ready(u8),
    Notification(String),
    Other(u8),
}

/// Why a read or write did not produce a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireErr {
    Timeout,
    Closed,
    Io(String),
    Protocol(String),
}

impl std::fmt::Display for WireErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireErr::Timeout => write!(f, "no answer in time"),
            WireErr::Closed => write!(f, "connection closed"),
            WireErr::Io(e) => write!(f, "i/o error: {e}"),
            WireErr::Protocol(e) => write!(f, "protocol: {e}"),
        }
    }
}

/// A failed connection attempt: the server's refusal or a transport problem.
#[derive(Debug)]
pub enum ConnectErr {
    Refused(Fields),
    Wire(WireErr),
}

pub struct Conn {
    sock: TcpStream,
    rbuf: BytesMut,
    pub addr: SocketAddr,
    /// Process id and secret from BackendKeyData, for CancelRequest.
    pub key: (i32, i32),
    /// The latest value of every ParameterStatus received.
    pub reported: BTreeMap<String, String>,
    /// Transaction status of the last ReadyForQuery.
    pub status: u8,
    pub log: VecDeque<String>,
    pub opened: Instant,
}

fn clip(s: &str) -> String {
    if s.len() <= LINE {
        return s.to_string();
    }
    let mut end = LINE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

fn show_bytes(b: &[u8]) -> String {
    clip(&String::from_utf8_lossy(b))
}

impl Msg {
    pub fn describe(&self) -> String {
        match self {
            Msg::Row(vals) => {
                let parts: Vec<String> = vals
                    .iter()
                    .map(|v| match v {
                        Some(b) if b.len() > 40 => format!("<{} bytes>", b.len()),
                        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
                        None => "NULL".into(),
                    })
                    .collect();
                clip(&format!("DataRow [{}]", parts.join(", ")))
            }
            Msg::Error(f) if f.hint.is_empty() => {
                clip(&format!("Error {} {} {}", f.severity, f.code, f.message))
            }
            Msg::Error(f) => clip(&format!(
                "Error {} {} {} (HINT: {})",
                f.severity, f.code, f.message, f.hint
            )),
            Msg::Notice(f) => clip(&format!("Notice {} {} {}", f.severity, f.code, f.message)),
            Msg::CopyData(b) => format!("CopyData {}", show_bytes(b)),
            Msg::Ready(s) => format!("Ready {}", *s as char),
            other => clip(&format!("{other:?}")),
        }
    }
}

impl Conn {
    /// Connects and completes startup (trust authentication) within `bound`.
    pub async fn connect(
        addr: SocketAddr,
        params: &[(String, String)],
        bound: Duration,
    ) -> Result<Conn, ConnectErr> {
        match tokio::time::timeout(bound, Self::startup(addr, params)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectErr::Wire(WireErr::Timeout)),
        }
    }

    async fn startup(addr: SocketAddr, params: &[(String, String)]) -> Result<Conn, ConnectErr> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectErr::Wire(WireErr::Io(e.to_string())))?;
        let _ = sock.set_nodelay(true);
        let mut c = Conn {
            sock,
            rbuf: BytesMut::with_capacity(16 * 1024),
            addr,
            key: (0, 0),
            reported: BTreeMap::new(),
            status: b'I',
            log: VecDeque::new(),
            opened: Instant::now(),
        };
        let mut all = vec![("user", "postgres"), ("database", "postgres")];
        all.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut b = BytesMut::new();
        frontend::startup_message(all.iter().copied(), &mut b).expect("startup message");
        c.note(format!("> Startup {params:?}"));
        c.write(&b).await.map_err(ConnectErr::Wire)?;
        loop {
            let (tag, body) = c.read_frame().await.map_err(ConnectErr::Wire)?;
            match tag {
                b'R' => {
                    let kind = body
                        .get(..4)
                        .map(|k| i32::from_be_bytes(k.try_into().unwrap()));
                    if kind != Some(0) {
                        return Err(ConnectErr::Wire(WireErr::Protocol(format!(
                            "authentication request {kind:?}; the tester uses trust only"
                        ))));
                    }
                }
                b'K' if body.len() >= 8 => {
                    let pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                    c.key = (pid, secret);
                }
                b'S' => c.param_status(&body),
                b'E' => return Err(ConnectErr::Refused(fields(&body))),
                b'N' => {}
                b'Z' => {
                    c.status = body.first().copied().unwrap_or(0);
                    c.note(format!("< Ready {}", c.status as char));
                    return Ok(c);
                }
                t => {
                    return Err(ConnectErr::Wire(WireErr::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    ))))
                }
            }
        }
    }

    fn note(&mut self, line: String) {
        if self.log.len() == TRANSCRIPT {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    pub fn transcript(&self) -> String {
        self.log
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn param_status(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        self.note(format!("< ParameterStatus {name}={value}"));
        self.reported.insert(name, value);
    }

    async fn write(&mut self, b: &[u8]) -> Result<(), WireErr> {
        match self.sock.write_all(b).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(WireErr::Closed),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(WireErr::Closed),
            Err(e) => Err(WireErr::Io(e.to_string())),
        }
    }

    /// Writes frontend messages; `what` goes to the transcript.
    pub async fn send(
        &mut self,
        b: &[u8],
        what: &[String],
        bound: Duration,
    ) -> Result<(), WireErr> {
        for w in what {
            self.note(format!("> {}", clip(w)));
        }
        match tokio::time::timeout(bound, self.write(b)).await {
            Ok(r) => r,
            Err(_) => Err(WireErr::Timeout),
        }
    }

    async fn read_frame(&mut self) -> Result<(u8, Bytes), WireErr> {
        loop {
            if self.rbuf.len() >= 5 {
                let len = u32::from_be_bytes(self.rbuf[1..5].try_into().unwrap()) as usize;
                if len < 4 {
                    return Err(WireErr::Protocol(format!("message length {len}")));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    self.rbuf.advance(5);
                    let body = self.rbuf.split_to(len - 4).freeze();
                    return Ok((tag, body));
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            self.rbuf.reserve(8192);
            match self.sock.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(WireErr::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(WireErr::Closed)
                }
                Err(e) => return Err(WireErr::Io(e.to_string())),
            }
        }
    }

    /// The next message other than ParameterStatus (recorded in `reported`), within `bound`.
    pub async fn recv(&mut self, bound: Duration) -> Result<Msg, WireErr> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    self.note(format!("< ({e})"));
                    return Err(e);
                }
                Err(_) => {
                    self.note(format!("< (nothing within {bound:?})"));
                    return Err(WireErr::Timeout);
                }
            };
            let (tag, body) = frame;
            if tag == b'S' {
                self.param_status(&body);
                continue;
            }
            let m = decode(tag, body)?;
            if let Msg::Ready(s) = m {
                self.status = s;
            }
            self.note(format!("< {}", m.describe()));
            return Ok(m);
        }
    }

    /// Drops the socket without Terminate, whatever is in flight.
    pub fn kill(self) {
        drop(self.sock);
    }

    /// Polite end: Terminate, then close.
    pub async fn terminate(mut self) {
        let mut b = BytesMut::new();
        frontend::terminate(&mut b);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.write(&b)).await;
    }
}

/// Sends a CancelRequest for `key` to `addr` and waits for the other side to close.
pub async fn cancel(addr: SocketAddr, key: (i32, i32)) {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut b = BytesMut::new();
        frontend::cancel_request(key.0, key.1, &mut b);
        s.write_all(&b).await?;
        let mut sink = [0u8; 16];
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), work).await;
}

fn cstr(body: &mut Bytes) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let s = String::from_utf8_lossy(&body[..end]).into_owned();
    body.advance((end + 1).min(body.len()));
    s
}

fn fields(body: &[u8]) -> Fields {
    let mut f = Fields {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        hint: String::new(),
    };
    let mut rest = Bytes::copy_from_slice(body);
    while let Some(&t) = rest.first() {
        if t == 0 {
            break;
        }
        rest.advance(1);
        let v = cstr(&mut rest);
        match t {
            b'S' => f.severity = v,
            b'C' => f.code = v,
            b'M' => f.message = v,
            b'H' => f.hint = v,
            _ => {}
        }
    }
    f
}

fn decode(tag: u8, mut body: Bytes) -> Result<Msg, WireErr> {
    let short = || WireErr::Protocol(format!("short {:?} message", tag as char));
    Ok(match tag {
        b'1' => Msg::ParseComplete,
        b'2' => Msg::BindComplete,
        b'3' => Msg::CloseComplete,
        b'n' => Msg::NoData,
        b'I' => Msg::EmptyQuery,
        b's' => Msg::PortalSuspended,
        b't' => Msg::ParamDesc(
            body.get(..2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(short)? as usize,
        ),
        b'T' => Msg::RowDesc(
            body.get(..2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(short)? as usize,
        ),
        b'D' => {
            if body.len() < 2 {
                return Err(short());
            }
            let n = body.get_u16() as usize;
            let mut vals = Vec::with_capacity(n);
            for _ in 0..n {
                if body.len() < 4 {
                    return Err(short());
                }
                let len = body.get_i32();
                if len < 0 {
                    vals.push(None);
                } else if body.len() < len as usize {
                    return Err(short());
                } else {
                    vals.push(Some(body.split_to(len as usize)));
                }
            }
            Msg::Row(vals)
        }
        b'C' => Msg::Complete(cstr(&mut body)),
        b'E' => Msg::Error(fields(&body)),
        b'N' => Msg::Notice(fields(&body)),
        b'G' => Msg::CopyIn,
        b'H' => Msg::CopyOut,
        b'd' => Msg::CopyData(body),
        b'c' => Msg::CopyDone,
        b'Z' => Msg::Ready(body.first().copied().ok_or_else(short)?),
        b'A' => {
            body.advance(4.min(body.len()));
            Msg::Notification(cstr(&mut body))
        }
        t => Msg::Other(t),
    })
}

/// Frontend messages accumulated for one write, with a transcript line per message.
#[derive(Default)]
pub struct Out {
    pub buf: BytesMut,
    pub what: Vec<String>,
    /// ReadyForQuery messages this write will cause.
    pub readys: usize,
    /// Ends inside an extended-protocol batch (no Sync after its last message).
    pub open: bool,
}

impl Out {
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn query(&mut self, sql: &str) {
        frontend::query(sql, &mut self.buf).expect("query");
        self.what.push(format!("Query {sql:?}"));
        self.readys += 1;
    }

    pub fn parse(&mut self, name: &str, sql: &str) {
        frontend::parse(name, sql, std::iter::empty(), &mut self.buf).expect("parse");
        self.open = true;
        self.what.push(format!("Parse {name:?} {sql:?}"));
    }

    /// Bind with text parameters and text results.
    pub fn bind(&mut self, portal: &str, stmt: &str, params: &[Option<&[u8]>]) {
        let r = frontend::bind(
            portal,
            stmt,
            std::iter::empty::<i16>(),
            params.iter().copied(),
            |v: Option<&[u8]>, buf: &mut BytesMut| match v {
                Some(v) => {
                    buf.extend_from_slice(v);
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            std::iter::empty::<i16>(),
            &mut self.buf,
        );
        assert!(r.is_ok(), "bind message");
        self.open = true;
        let shown: Vec<String> = params
            .iter()
            .map(|p| match p {
                Some(v) if v.len() > 40 => format!("<{} bytes>", v.len()),
                Some(v) => format!("{:?}", String::from_utf8_lossy(v)),
                None => "NULL".into(),
            })
            .collect();
        self.what
            .push(format!("Bind {portal:?} {stmt:?} [{}]", shown.join(", ")));
    }

    pub fn describe(&mut self, kind: u8, name: &str) {
        frontend::describe(kind, name, &mut self.buf).expect("describe");
        self.open = true;
        self.what
            .push(format!("Describe {} {name:?}", kind as char));
    }

    pub fn execute(&mut self, portal: &str, max_rows: i32) {
        frontend::execute(portal, max_rows, &mut self.buf).expect("execute");
        self.open = true;
        self.what.push(format!("Execute {portal:?} {max_rows}"));
    }

    pub fn close(&mut self, kind: u8, name: &str) {
        frontend::close(kind, name, &mut self.buf).expect("close");
        self.open = true;
        self.what.push(format!("Close {} {name:?}", kind as char));
    }

    pub fn sync(&mut self) {
        frontend::sync(&mut self.buf);
        self.open = false;
        self.what.push("Sync".into());
        self.readys += 1;
    }

    pub fn flush(&mut self) {
        frontend::flush(&mut self.buf);
        self.what.push("Flush".into());
    }

    pub fn copy_data(&mut self, data: &[u8]) {
        frontend::CopyData::new(data)
            .expect("copy data")
            .write(&mut self.buf);
        self.what.push(format!("CopyData {}", show_bytes(data)));
    }

    pub fn copy_done(&mut self) {
        frontend::copy_done(&mut self.buf);
        self.what.push("CopyDone".into());
    }

    pub fn copy_fail(&mut self, why: &str) {
        frontend::copy_fail(why, &mut self.buf).expect("copy fail");
        self.what.push(format!("CopyFail {why:?}"));
    }
}
