//! Messages the proxy writes itself. All append to a caller-owned buffer so the hot path
//! can reuse one allocation.

use bytes::{BufMut, BytesMut};

/// Severity of an ErrorResponse the proxy generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Starts a typed message; returns the offset of its length field for `finish`.
fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends one typed message whose body `body` writes; its length is filled in after.
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let at = begin(buf, tag);
    body(buf);
    finish(buf, at);
}

/// A C string; a NUL inside `s` becomes `?`.
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a generated string would corrupt framing for the client.
    for b in s.bytes() {
        buf.put_u8(if b == 0 { b'?' } else { b });
    }
    buf.put_u8(0);
}

/// ErrorResponse ('E') with severity, SQLSTATE, message and optional hint.
pub fn error_response(
    buf: &mut BytesMut,
    sev: Severity,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let at = begin(buf, b'E');
    buf.put_u8(b'S');
    put_cstr(buf, sev.as_str());
    buf.put_u8(b'V');
    put_cstr(buf, sev.as_str());
    buf.put_u8(b'C');
    put_cstr(buf, code);
    buf.put_u8(b'M');
    put_cstr(buf, message);
    if let Some(h) = hint {
        buf.put_u8(b'H');
        put_cstr(buf, h);
    }
    buf.put_u8(0);
    finish(buf, at);
}

/// NoticeResponse ('N') at WARNING severity.
pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    let at = begin(buf, b'N');
    buf.put_u8(b'S');
    put_cstr(buf, "WARNING");
    buf.put_u8(b'V');
    put_cstr(buf, "WARNING");
    buf.put_u8(b'C');
    put_cstr(buf, code);
    buf.put_u8(b'M');
    put_cstr(buf, message);
    buf.put_u8(0);
    finish(buf, at);
}

/// Authentication request ('R') with a code and optional payload.
pub fn authentication(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(payload);
    finish(buf, at);
}

pub fn auth_ok(buf: &mut BytesMut) {
    authentication(buf, 0, &[]);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    put_cstr(buf, name);
    put_cstr(buf, value);
    finish(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(buf, b'K');
    buf.put_i32(pid);
    buf.put_i32(secret);
    finish(buf, at);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let at = begin(buf, b'Z');
    buf.put_u8(status);
    finish(buf, at);
}

/// Simple Query ('Q').
pub fn query(buf: &mut BytesMut, sql: &str) {
    let at = begin(buf, b'Q');
    put_cstr(buf, sql);
    finish(buf, at);
}

/// CommandComplete ('C') with `tag`.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag));
}

pub fn terminate(buf: &mut BytesMut) {
    let at = begin(buf, b'X');
    finish(buf, at);
}

/// StartupMessage for protocol 3.0 (no type byte).
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_i32(super::PROTOCOL_VERSION_3);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// CancelRequest packet (16 bytes, no type byte).
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&super::CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Fields of an ErrorResponse/NoticeResponse body we care about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// Parses an ErrorResponse/NoticeResponse body (after type and length).
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(nul) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        let value = String::from_utf8_lossy(&tail[..nul]).into_owned();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
        rest = &tail[nul + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_roundtrip() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Error,
            "53400",
            "pgsluice: database busy",
            Some("h"),
        );
        assert_eq!(b[0], b'E');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let f = parse_error_fields(&b[5..]);
        assert_eq!(f.code, "53400");
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.message, "pgsluice: database busy");
    }

    #[test]
    fn nul_in_message_is_neutralised() {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Fatal, "08P01", "a\0b", None);
        assert_eq!(parse_error_fields(&b[5..]).message, "a?b");
    }
}
