//! Who may call the mutating endpoints (`/pause`, `/resume`, `/reload`).
//!
//! Without a configured token only loopback callers may mutate: anyone who can reach the
//! admin port from another host would otherwise be able to stop traffic. With a token, every
//! caller, loopback included, must present it, so a token cannot be bypassed by a process
//! sharing the host (e.g. another container in the same network namespace).

use std::net::IpAddr;

use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// A token is configured and the request lacks it or carries the wrong one (401).
    Unauthorized,
    /// No token is configured and the caller is not on loopback (403).
    Forbidden,
}

/// Decides whether a mutating request from `peer` may proceed. `authorization` is the raw
/// `Authorization` header value, if any.
pub fn check(peer: IpAddr, token: Option<&str>, authorization: Option<&[u8]>) -> Access {
    match token {
        Some(token) => match authorization.and_then(bearer) {
            Some(given) if bool::from(given.ct_eq(token.as_bytes())) => Access::Allowed,
            _ => Access::Unauthorized,
        },
        None if peer.to_canonical().is_loopback() => Access::Allowed,
        None => Access::Forbidden,
    }
}

/// The credentials of a `Bearer` authorization header; the scheme name is case-insensitive.
fn bearer(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() < SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let creds = header[SCHEME.len()..].trim_ascii();
    (!creds.is_empty()).then_some(creds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ip(addr: &str) -> IpAddr {
        match addr.parse::<SocketAddr>() {
            Ok(a) => a.ip(),
            Err(e) => panic!("bad test address {addr}: {e}"),
        }
    }

    #[test]
    fn without_token_loopback_is_allowed() {
        for a in [
            "127.0.0.1:40000",
            "127.8.9.10:1",
            "[::1]:40000",
            "[::ffff:127.0.0.1]:2",
        ] {
            assert_eq!(check(ip(a), None, None), Access::Allowed, "{a}");
        }
    }

    #[test]
    fn without_token_other_hosts_are_forbidden() {
        for a in [
            "10.0.0.5:1234",
            "192.168.1.2:80",
            "[2001:db8::1]:9",
            "[::ffff:10.0.0.5]:3",
        ] {
            assert_eq!(check(ip(a), None, None), Access::Forbidden, "{a}");
            // A header does not help when no token is configured.
            assert_eq!(
                check(ip(a), None, Some(b"Bearer x")),
                Access::Forbidden,
                "{a}"
            );
        }
    }

    #[test]
    fn with_token_every_caller_must_present_it() {
        let t = Some("s3cret");
        for a in ["127.0.0.1:1", "10.0.0.5:1234"] {
            let p = ip(a);
            assert_eq!(check(p, t, None), Access::Unauthorized, "{a}");
            assert_eq!(
                check(p, t, Some(b"Bearer wrong")),
                Access::Unauthorized,
                "{a}"
            );
            assert_eq!(
                check(p, t, Some(b"Bearer s3cre")),
                Access::Unauthorized,
                "{a}"
            );
            assert_eq!(
                check(p, t, Some(b"Bearer s3cretx")),
                Access::Unauthorized,
                "{a}"
            );
            assert_eq!(
                check(p, t, Some(b"Basic s3cret")),
                Access::Unauthorized,
                "{a}"
            );
            assert_eq!(check(p, t, Some(b"Bearer ")), Access::Unauthorized, "{a}");
            assert_eq!(check(p, t, Some(b"s3cret")), Access::Unauthorized, "{a}");
            assert_eq!(check(p, t, Some(b"Bearer s3cret")), Access::Allowed, "{a}");
            assert_eq!(
                check(p, t, Some(b"bearer  s3cret ")),
                Access::Allowed,
                "{a}"
            );
        }
    }
}
