//! A raw protocol client on postgres-protocol's codecs, for tests where the exact message
//! sequence matters (what a driver would hide): messages are queued, sent in one write, and
//! every answer up to a ReadyForQuery is recorded in order.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend::Message, frontend};
use postgres_protocol::IsNull;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server message, reduced to what tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    /// ParameterDescription: the parameter type OIDs.
    Params(Vec<u32>),
    /// RowDescription: column names.
    Columns(Vec<String>),
    Row(Vec<Option<String>>),
    Command(String),
    /// ErrorResponse: SQLSTATE and message.
    Error(String, String),
    CopyIn,
    Empty,
    Ready(u8),
    Other(u8),
}

pub struct RawClient {
    s: TcpStream,
    out: BytesMut,
    inb: BytesMut,
}

impl RawClient {
    /// Connects as postgres to database postgres and waits for the first ReadyForQuery.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).await.expect("connect");
        let mut c = RawClient {
            s,
            out: BytesMut::new(),
            inb: BytesMut::new(),
        };
        frontend::startup_message([("user", "postgres"), ("database", "postgres")], &mut c.out)
            .unwrap();
        let got = c.roundtrip().await;
        assert!(
            !got.iter().any(|g| matches!(g, Got::Error(..))),
            "startup: {got:?}"
        );
        c
    }

    pub fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        frontend::parse(name, sql, std::iter::empty(), &mut self.out).unwrap();
        self
    }

    /// Bind of the unnamed portal with text parameters, text results.
    pub fn bind(&mut self, stmt: &str, params: &[&str]) -> &mut Self {
        let r = frontend::bind(
            "",
            stmt,
            std::iter::empty::<i16>(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok::<_, Box<dyn std::error::Error + Sync + Send>>(IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut self.out,
        );
        assert!(r.is_ok(), "bind encoding");
        self
    }

    pub fn execute(&mut self) -> &mut Self {
        frontend::execute("", 0, &mut self.out).unwrap();
        self
    }

    pub fn describe_stmt(&mut self, name: &str) -> &mut Self {
        frontend::describe(b'S', name, &mut self.out).unwrap();
        self
    }

    pub fn close_stmt(&mut self, name: &str) -> &mut Self {
        frontend::close(b'S', name, &mut self.out).unwrap();
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.out);
        self
    }

    pub fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.out).unwrap();
        self
    }

    pub fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        frontend::CopyData::new(data).unwrap().write(&mut self.out);
        self
    }

    /// Writes the first `n` queued bytes; the rest stays queued.
    pub async fn send_first(&mut self, n: usize) {
        let part = self.out.split_to(n.min(self.out.len()));
        self.s.write_all(&part).await.expect("write");
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes everything queued.
    pub async fn send(&mut self) {
        let out = self.out.split();
        self.s.write_all(&out).await.expect("write");
    }

    /// Sends what is queued and reads up to the next ReadyForQuery (10 s at most).
    pub async fn roundtrip(&mut self) -> Vec<Got> {
        self.send().await;
        self.until(|g| matches!(g, Got::Ready(_))).await
    }

    /// Reads messages until one matches `stop` (included).
    pub async fn until(&mut self, stop: impl Fn(&Got) -> bool) -> Vec<Got> {
        let read = async {
            let mut got = Vec::new();
            for _ in 0..100_000 {
                let g = self.next().await;
                let done = stop(&g);
                got.push(g);
                if done {
                    return got;
                }
            }
            panic!("no end after 100000 messages: {got:?}");
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(got) => got,
            Err(_) => panic!("no answer within 10 s"),
        }
    }

    async fn next(&mut self) -> Got {
        loop {
            if let Some(m) = Message::parse(&mut self.inb).expect("server message") {
                return reduce(m);
            }
            let n = self.s.read_buf(&mut self.inb).await.expect("read");
            assert!(n > 0, "server closed the connection");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn reduce(m: Message) -> Got {
    match m {
        Message::ParseComplete => Got::ParseComplete,
        Message::BindComplete => Got::BindComplete,
        Message::CloseComplete => Got::CloseComplete,
        Message::NoData => Got::NoData,
        Message::ParameterDescription(b) => Got::Params(b.parameters().collect().unwrap()),
        Message::RowDescription(b) => Got::Columns(
            b.fields()
                .map(|f| Ok(f.name().to_string()))
                .collect()
                .unwrap(),
        ),
        Message::DataRow(b) => {
            let buf = b.buffer();
            Got::Row(
                b.ranges()
                    .map(|r| Ok(r.map(|r| text(&buf[r]))))
                    .collect()
                    .unwrap(),
            )
        }
        Message::CommandComplete(b) => Got::Command(b.tag().unwrap().to_string()),
        Message::ErrorResponse(b) => {
            let (mut code, mut msg) = (String::new(), String::new());
            let mut f = b.fields();
            while let Some(f) = f.next().unwrap() {
                match f.type_() {
                    b'C' => code = text(f.value_bytes()),
                    b'M' => msg = text(f.value_bytes()),
                    _ => {}
                }
            }
            Got::Error(code, msg)
        }
        Message::CopyInResponse(_) => Got::CopyIn,
        Message::EmptyQueryResponse => Got::Empty,
        Message::ReadyForQuery(b) => Got::Ready(b.status()),
        Message::NoticeResponse(_) => Got::Other(b'N'),
        Message::ParameterStatus(_) => Got::Other(b'S'),
        Message::BackendKeyData(_) => Got::Other(b'K'),
        Message::AuthenticationOk => Got::Other(b'R'),
        _ => Got::Other(b'?'),
    }
}

/// The messages of a reply without NoticeResponse/ParameterStatus noise.
pub fn essential(got: &[Got]) -> Vec<Got> {
    got.iter()
        .filter(|g| !matches!(g, Got::Other(b'N' | b'S')))
        .cloned()
        .collect()
}

/// The SQLSTATEs of a reply.
pub fn errors(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| match g {
            Got::Error(c, _) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// The first column of each row.
pub fn rows(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| match g {
            Got::Row(r) => Some(r.first().cloned().flatten().unwrap_or_default()),
            _ => None,
        })
        .collect()
}
