//! Server side of PostgreSQL's MD5 password exchange. A fresh random salt per login means a
//! captured response cannot be replayed; the stored hash is still password-equivalent, which
//! is why SCRAM is preferred.

use super::{read_client_response, send_auth, AuthError};
use md5::{Digest, Md5};
use rand::RngCore;
use std::fmt::Write;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

const AUTH_MD5: i32 = 5;

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// PostgreSQL's stored form: "md5" + hex(md5(password + user)).
pub fn md5_stored(password: &str, user: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// The response a client must send for `stored` (the 35-char "md5..." form) and `salt`.
pub fn expected_response(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// True for PostgreSQL's stored MD5 form: "md5" followed by 32 lowercase hex digits.
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("md5")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Runs the exchange against `stored`; Ok(false) means a wrong password. `genuine` is false
/// for an unknown user's stand-in, which never succeeds.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    stored: &str,
    genuine: bool,
) -> Result<bool, AuthError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    authenticate_with_salt(stream, stored, genuine, salt).await
}

pub(crate) async fn authenticate_with_salt<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    stored: &str,
    genuine: bool,
    salt: [u8; 4],
) -> Result<bool, AuthError> {
    send_auth(stream, AUTH_MD5, &salt).await?;
    let body = read_client_response(stream).await?;
    // PasswordMessage is a C string; take it up to the terminator.
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| AuthError::Protocol("malformed password message".into()))?;
    let expected = expected_response(stored, salt);
    let ok = body[..nul].ct_eq(expected.as_bytes());
    Ok(bool::from(ok) && genuine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_md5_matches_postgres_protocol_client() {
        let salt = [1, 2, 3, 4];
        let stored = md5_stored("secret", "alice");
        assert!(is_md5_hash(&stored));
        assert_eq!(
            expected_response(&stored, salt),
            postgres_protocol::authentication::md5_hash(b"alice", b"secret", salt)
        );
    }

    #[test]
    fn auth_md5_hash_shape() {
        assert!(!is_md5_hash("md5"));
        assert!(!is_md5_hash("md5ABCDEF0123456789abcdef0123456789"));
        assert!(!is_md5_hash("xyz0123456789abcdef0123456789abcdef"));
        assert!(is_md5_hash("md50123456789abcdef0123456789abcdef"));
    }
}
