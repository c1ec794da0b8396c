//! Packets read before the regular message stream: SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage; and a small-message reader for the authentication exchange.

use super::*;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        params: Vec<(String, String)>,
    },
    /// A Terminate message ('X', length 4) where a startup packet belongs: the client gave
    /// up before starting; PostgreSQL closes without a word.
    Terminate,
}

impl StartupPacket {
    /// Parses a whole startup packet body (everything after the 4-byte length).
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() < 4 {
            return Err(ProtocolError::Malformed("startup packet too short"));
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let rest = &body[4..];
        match code {
            SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
            GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
            CANCEL_REQUEST_CODE if rest.len() == 8 => Ok(StartupPacket::Cancel {
                pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
            }),
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => Err(
                ProtocolError::Malformed("bad length for special startup packet"),
            ),
            PROTOCOL_VERSION_3 => Ok(StartupPacket::Startup {
                params: parse_params(rest)?,
            }),
            other => Err(ProtocolError::UnsupportedVersion {
                major: (other >> 16) as u16,
                minor: (other & 0xffff) as u16,
            }),
        }
    }

    pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut out = Vec::new();
    loop {
        let (key, r) = take_cstr(rest)?;
        rest = r;
        if key.is_empty() {
            break;
        }
        let (val, r) = take_cstr(rest)?;
        rest = r;
        out.push((key.to_owned(), val.to_owned()));
    }
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(
            "trailing bytes after startup parameters",
        ));
    }
    Ok(out)
}

/// Splits a NUL-terminated UTF-8 string off the front of `buf`.
pub fn take_cstr(buf: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("missing string terminator"))?;
    let s =
        std::str::from_utf8(&buf[..nul]).map_err(|_| ProtocolError::Malformed("invalid UTF-8"))?;
    Ok((s, &buf[nul + 1..]))
}

/// Reads one startup-phase packet (length-prefixed, no type byte).
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ProtocolError> {
    let mut word = [0u8; 4];
    r.read_exact(&mut word).await?;
    let len = i32::from_be_bytes(word);
    if word == [b'X', 0, 0, 0] {
        // A Terminate's length word ends in the byte after its tag.
        if r.read_u8().await? == 4 {
            return Ok(StartupPacket::Terminate);
        }
        return Err(ProtocolError::BadLength(len as i64));
    }
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    StartupPacket::parse(&body)
}

/// Reads one typed message whose body must fit in `max_len`; used outside the relay
/// (authentication, server start-up), where messages are small.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<(u8, BytesMut), ProtocolError> {
    let tag = r.read_u8().await?;
    let len = r.read_i32().await?;
    if len < 4 || len as usize - 4 > max_len {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await?;
    Ok((tag, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = PROTOCOL_VERSION_3.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn parses_startup() {
        let p = StartupPacket::parse(&startup_body(&[("user", "u"), ("database", "d")])).unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())]
            }
        );
    }

    #[test]
    fn rejects_bad_version_and_garbage() {
        let mut b = startup_body(&[]);
        b[0..4].copy_from_slice(&0x0002_0000i32.to_be_bytes());
        assert!(matches!(
            StartupPacket::parse(&b),
            Err(ProtocolError::UnsupportedVersion { major: 2, minor: 0 })
        ));
        assert!(StartupPacket::parse(&[0, 3, 0, 0, b'u', b's']).is_err());
        assert!(StartupPacket::parse(&[1, 2]).is_err());
        let mut c = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        c.extend_from_slice(&[0; 7]);
        assert!(StartupPacket::parse(&c).is_err());
    }

    #[tokio::test]
    async fn terminate_instead_of_startup() {
        let mut t: &[u8] = &[b'X', 0, 0, 0, 4];
        assert_eq!(
            read_startup(&mut t).await.unwrap(),
            StartupPacket::Terminate
        );
        let mut other: &[u8] = &[b'X', 0, 0, 0, 5];
        assert!(matches!(
            read_startup(&mut other).await,
            Err(ProtocolError::BadLength(_))
        ));
    }

    #[tokio::test]
    async fn read_startup_rejects_lengths() {
        let mut neg: &[u8] = &(-5i32).to_be_bytes();
        assert!(matches!(
            read_startup(&mut neg).await,
            Err(ProtocolError::BadLength(-5))
        ));
        let mut huge: &[u8] = &(1i32 << 30).to_be_bytes();
        assert!(matches!(
            read_startup(&mut huge).await,
            Err(ProtocolError::BadLength(_))
        ));
    }
}
