//! SCRAM-SHA-256 verifiers in PostgreSQL's text form
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

/// Iteration count for verifiers this crate creates; PostgreSQL's default.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length for verifiers this crate creates; PostgreSQL's default.
pub const DEFAULT_SALT_LEN: usize = 16;
const PREFIX: &str = "SCRAM-SHA-256$";

/// What the server keeps to check a SCRAM-SHA-256 login without knowing the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

// Keys are password-equivalent for SCRAM impersonation of the server; keep them out of logs.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SASLprep the password as PostgreSQL and libpq do; fall back to the raw bytes when the
/// password is not a valid SASLprep string (PostgreSQL does the same).
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

impl ScramVerifier {
    /// Derives the verifier for `password` (PBKDF2-HMAC-SHA-256, the SCRAM "Hi" function).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalize(password), salt, iterations, &mut salted);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// Derives a verifier with a fresh random salt and the default iteration count.
    pub fn generate(password: &str) -> Self {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// True when `s` claims to be a SCRAM verifier (whether or not it is well formed).
    pub fn looks_like(s: &str) -> bool {
        s.starts_with(PREFIX)
    }

    /// Parses PostgreSQL's text form. Errors describe the problem without echoing the input.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix(PREFIX)
            .ok_or("SCRAM verifier must start with \"SCRAM-SHA-256$\"")?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or("SCRAM verifier lacks the '$' before the keys")?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or("SCRAM verifier lacks the ':' between iteration count and salt")?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or("SCRAM verifier lacks the ':' between StoredKey and ServerKey")?;
        let iterations: u32 = iter
            .parse()
            .ok()
            .filter(|&n| n > 0 && n <= i32::MAX as u32)
            .ok_or("SCRAM verifier iteration count must be a positive integer")?;
        let salt = B64
            .decode(salt)
            .map_err(|_| "SCRAM verifier salt is not valid base64")?;
        if salt.is_empty() {
            return Err("SCRAM verifier salt is empty".into());
        }
        let key = |field: &str, what: &str| -> Result<[u8; 32], String> {
            let bytes = B64
                .decode(field)
                .map_err(|_| format!("SCRAM verifier {what} is not valid base64"))?;
            bytes
                .try_into()
                .map_err(|_| format!("SCRAM verifier {what} is not 32 bytes"))
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// A PostgreSQL-format SCRAM-SHA-256 verifier for `password` with a random salt and 4096
/// iterations, suitable for a users file or `ALTER ROLE ... PASSWORD`.
pub fn scram_verifier_for(password: &str) -> String {
    ScramVerifier::generate(password).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_verifier_round_trips_text_form() {
        let v = ScramVerifier::from_password("secret", b"0123456789abcdef", 4096);
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"));
        assert_eq!(ScramVerifier::parse(&text).unwrap(), v);
    }

    #[test]
    fn auth_verifier_keys_follow_rfc5802_independently_computed() {
        // Recompute SaltedPassword = Hi(password, salt, i) by hand from HMAC iterations.
        let salt = b"NaCl-salt-123456";
        let iters = 50u32;
        let mut u = hmac_sha256(b"pencil", &[salt, &1u32.to_be_bytes()]);
        let mut salted = u;
        for _ in 1..iters {
            u = hmac_sha256(b"pencil", &[&u]);
            for (s, x) in salted.iter_mut().zip(u) {
                *s ^= x;
            }
        }
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        let v = ScramVerifier::from_password("pencil", salt, iters);
        assert_eq!(v.stored_key, sha256(&client_key));
        assert_eq!(v.server_key, hmac_sha256(&salted, &[b"Server Key"]));
    }

    #[test]
    fn auth_verifier_matches_postgres_protocol_generator() {
        // postgres-protocol's generator uses a random salt: parse it, rederive with its salt.
        let text = postgres_protocol::password::scram_sha_256(b"hunter2");
        let theirs = ScramVerifier::parse(&text).unwrap();
        let ours = ScramVerifier::from_password("hunter2", &theirs.salt, theirs.iterations);
        assert_eq!(ours, theirs);
        assert_eq!(ours.to_string(), text);
    }

    #[test]
    fn auth_verifier_rejects_malformed_without_echo() {
        for bad in [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:$AAAA:AAAA",
        ] {
            let err = ScramVerifier::parse(bad).unwrap_err();
            assert!(!err.contains("c2FsdA"), "{err}");
        }
    }

    #[test]
    fn auth_generated_verifiers_differ_by_salt() {
        let a = scram_verifier_for("pw");
        let b = scram_verifier_for("pw");
        assert_ne!(a, b);
        assert_eq!(ScramVerifier::parse(&a).unwrap().iterations, 4096);
    }
}
