//! A frontend on a raw socket: the test decides exactly when the connection closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A frontend speaking the wire protocol over a raw socket, so a test decides exactly when
/// the socket closes.
pub struct RawClient {
    s: TcpStream,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, app: &str) -> RawClient {
        let s = TcpStream::connect(addr).await.expect("connect to proxy");
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", app),
        ] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        let mut c = RawClient { s };
        c.s.write_all(&pkt).await.expect("send startup");
        let msgs = c
            .read_until_ready(Duration::from_secs(10))
            .await
            .expect("startup");
        assert!(
            msgs.iter().any(|(t, _)| *t == b'R'),
            "no AuthenticationOk in {msgs:?}"
        );
        c
    }

    pub async fn send_query(&mut self, sql: &str) {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        self.s.write_all(&m).await.expect("send query");
    }

    /// One backend message; Err on EOF or a socket error.
    pub async fn read_msg(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let tag = self.s.read_u8().await?;
        let len = self.s.read_i32().await?;
        if !(4..=1 << 24).contains(&len) {
            return Err(std::io::Error::other(format!("bad length {len}")));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.s.read_exact(&mut body).await?;
        Ok((tag, body))
    }

    pub async fn read_until_ready(
        &mut self,
        limit: Duration,
    ) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let fut = async {
            let mut out = Vec::new();
            for _ in 0..10_000 {
                let (tag, body) = self.read_msg().await.map_err(|e| e.to_string())?;
                out.push((tag, body));
                if tag == b'Z' {
                    return Ok(out);
                }
            }
            Err("too many messages".to_string())
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| format!("no ReadyForQuery within {limit:?}"))?
    }
}

/// The SQLSTATE of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}
