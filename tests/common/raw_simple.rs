//! A frontend on a raw socket: arbitrary startup parameters, pipelined simple queries, and
//! every message the proxy (or server) sends, ParameterStatus included.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// A frontend on a raw socket with arbitrary startup parameters.
pub struct Raw {
    pub s: TcpStream,
    /// ParameterStatus values from the greeting.
    pub status: HashMap<String, String>,
}

/// An ErrorResponse: (severity, SQLSTATE, message).
pub type PgError = (String, String, String);

pub fn error_fields(body: &[u8]) -> PgError {
    let mut f = (String::new(), String::new(), String::new());
    for part in body.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let v = String::from_utf8_lossy(&part[1..]).into_owned();
        match part[0] {
            b'V' => f.0 = v,
            b'C' => f.1 = v,
            b'M' => f.2 = v,
            _ => {}
        }
    }
    f
}

impl Raw {
    pub async fn connect(addr: SocketAddr, params: &[(&str, &str)]) -> Result<Raw, PgError> {
        let s = TcpStream::connect(addr).await.expect("connect to proxy");
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", "postgres"), ("database", "postgres")]
            .iter()
            .chain(params)
        {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        let mut c = Raw {
            s,
            status: HashMap::new(),
        };
        c.s.write_all(&pkt).await.expect("send startup");
        for (tag, body) in c.until_ready().await {
            match tag {
                b'E' => return Err(error_fields(&body)),
                b'S' => {
                    let mut it = body.split(|&b| b == 0);
                    let k = String::from_utf8_lossy(it.next().unwrap_or_default());
                    let v = String::from_utf8_lossy(it.next().unwrap_or_default());
                    c.status.insert(k.into_owned(), v.into_owned());
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Messages up to ReadyForQuery (or the connection's end).
    pub async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let read = async {
            loop {
                let mut h = [0u8; 5];
                if self.s.read_exact(&mut h).await.is_err() {
                    return;
                }
                let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                let mut body = vec![0u8; len.saturating_sub(4)];
                if self.s.read_exact(&mut body).await.is_err() {
                    return;
                }
                out.push((h[0], body));
                if h[0] == b'Z' {
                    return;
                }
            }
        };
        tokio::time::timeout(T, read).await.expect("proxy answered");
        out
    }

    /// Sends simple queries, one message each, in one write, without waiting for answers.
    pub async fn send(&mut self, sqls: &[&str]) {
        let mut m = Vec::new();
        for sql in sqls {
            m.push(b'Q');
            m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
            m.extend_from_slice(sql.as_bytes());
            m.push(0);
        }
        self.s.write_all(&m).await.expect("send query");
    }

    /// First column of the first row of a simple query, or its error.
    pub async fn query(&mut self, sql: &str) -> Result<String, PgError> {
        self.send(&[sql]).await;
        let mut first = None;
        for (tag, body) in self.until_ready().await {
            match tag {
                b'E' => return Err(error_fields(&body)),
                b'D' if first.is_none() => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    first = Some(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                _ => {}
            }
        }
        Ok(first.expect("a row"))
    }

    /// Runs one simple Query (may hold several statements): the first column of every row
    /// in order, or the first error. ParameterStatus messages update `status`.
    pub async fn batch(&mut self, sql: &str) -> Result<Vec<String>, PgError> {
        self.send(&[sql]).await;
        let mut rows = Vec::new();
        let mut err = None;
        for (tag, body) in self.until_ready().await {
            match tag {
                b'E' if err.is_none() => err = Some(error_fields(&body)),
                b'S' => {
                    let mut it = body.split(|&b| b == 0);
                    let k = String::from_utf8_lossy(it.next().unwrap_or_default());
                    let v = String::from_utf8_lossy(it.next().unwrap_or_default());
                    self.status.insert(k.into_owned(), v.into_owned());
                }
                b'D' => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    rows.push(if len < 0 {
                        "NULL".to_string()
                    } else {
                        String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                    });
                }
                _ => {}
            }
        }
        err.map_or(Ok(rows), Err)
    }
}
