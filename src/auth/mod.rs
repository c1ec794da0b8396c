//! Client-facing and upstream authentication.
//!
//! Client side: trust, md5 and SCRAM-SHA-256 against a users file. Upstream side: the proxy
//! logs in to PostgreSQL with whatever method the server asks for (see [`upstream`]).

pub mod md5;
pub mod scram;
mod scram_client;
pub mod upstream;
pub mod users;
pub mod verifier;

#[cfg(test)]
mod tests;

pub use scram::ScramKeys;
pub use upstream::{
    upstream_login, upstream_startup, upstream_startup_bound, Binding, Credentials, UpstreamAuth,
    UpstreamAuthError, UpstreamStartup,
};
pub use users::{Secret, UserEntry, UserStore};
pub use verifier::{scram_verifier_for, ScramVerifier};

use crate::protocol::{self, ProtocolError, MAX_AUTH_MESSAGE_LEN};
use bytes::BytesMut;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A configuration value (`--auth`), defined with the rest of the configuration.
pub use crate::config::AuthMethod;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password or unknown user; deliberately indistinguishable.
    #[error("password authentication failed for user \"{user}\"")]
    PasswordFailed { user: String },
    /// The stored secret cannot serve the configured method.
    #[error("{method} authentication is not possible for user \"{user}\": {reason}")]
    MethodUnavailable {
        user: String,
        method: &'static str,
        reason: &'static str,
    },
    #[error("protocol violation during authentication: {0}")]
    Protocol(String),
    #[error("i/o during authentication: {0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::PasswordFailed { .. } => "28P01",
            AuthError::MethodUnavailable { .. } => "28000",
            AuthError::Protocol(_) | AuthError::Io(_) => "08P01",
        }
    }

    /// Text for the client's ErrorResponse (PostgreSQL's wording where one exists).
    pub fn client_message(&self) -> String {
        match self {
            AuthError::Protocol(m) => m.clone(),
            AuthError::Io(_) => "connection lost during authentication".into(),
            other => other.to_string(),
        }
    }

    /// True when the client simply went away: nothing to send, nothing worth a warning.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, AuthError::Io(_))
    }
}

impl From<ProtocolError> for AuthError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(io) => AuthError::Io(io),
            other => AuthError::Protocol(other.to_string()),
        }
    }
}

/// Writes an Authentication request ('R') and flushes it.
pub(crate) async fn send_auth<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: i32,
    payload: &[u8],
) -> Result<(), AuthError> {
    let mut buf = BytesMut::with_capacity(9 + payload.len());
    protocol::authentication(&mut buf, code, payload);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads the client's next authentication message, which must be a 'p' message.
pub(crate) async fn read_client_response<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<BytesMut, AuthError> {
    let (tag, body) = protocol::read_message(stream, MAX_AUTH_MESSAGE_LEN).await?;
    if tag != b'p' {
        return Err(AuthError::Protocol(format!(
            "expected a password response, got message type '{}'",
            char::from(tag).escape_default()
        )));
    }
    Ok(body)
}

/// Process-wide random key so stand-in salts for unknown users are stable per name (a salt
/// that changed on every attempt would reveal that the user does not exist) yet unguessable.
fn mock_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        k
    })
}

/// A verifier for a user that does not exist: a real verifier of a random password (so
/// checking a proof costs the same), with a per-name stable salt.
fn mock_scram_verifier(user: &str) -> ScramVerifier {
    static BASE: OnceLock<ScramVerifier> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let mut pw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut pw);
        // One iteration: only the keys matter, the advertised count is set below.
        ScramVerifier::from_password(&md5::hex(&pw), b"stand-in", 1)
    });
    let mut salt = Sha256::new();
    salt.update(mock_key());
    salt.update(b"scram");
    salt.update(user.as_bytes());
    let mut v = base.clone();
    v.iterations = verifier::DEFAULT_ITERATIONS;
    v.salt = salt.finalize()[..verifier::DEFAULT_SALT_LEN].to_vec();
    v
}

fn mock_md5_hash(user: &str) -> String {
    let mut h = Sha256::new();
    h.update(mock_key());
    h.update(b"md5");
    h.update(user.as_bytes());
    md5::md5_stored(&md5::hex(&h.finalize()), user)
}

/// Runs the client-facing authentication exchange right after the StartupMessage. Writes the
/// authentication requests and reads the client's responses; it does NOT write
/// AuthenticationOk nor the ErrorResponse: the caller does, from the returned error.
/// An unknown user goes through the same exchange as a known one and fails the same way.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthMethod,
    user: &str,
    users: &UserStore,
) -> Result<Authenticated, AuthError> {
    authenticate_entry(stream, method, user, users.get(user)).await
}

/// What a successful client authentication leaves behind.
#[derive(Debug, Default)]
pub struct Authenticated {
    /// Set after SCRAM: logs the proxy in upstream as this user without a password.
    pub scram_keys: Option<ScramKeys>,
}

/// [`authenticate_client`] against one looked-up entry (`None`: the user is unknown).
pub async fn authenticate_entry<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthMethod,
    user: &str,
    entry: Option<&UserEntry>,
) -> Result<Authenticated, AuthError> {
    let unavailable = |method, reason| AuthError::MethodUnavailable {
        user: user.to_owned(),
        method,
        reason,
    };
    let scram = |keys: Option<ScramKeys>| (keys.is_some(), keys);
    let (passed, scram_keys) = match method {
        AuthMethod::Trust => return Ok(Authenticated::default()),
        AuthMethod::ScramSha256 => match entry {
            None => scram(scram::authenticate(stream, &mock_scram_verifier(user), false).await?),
            Some(e) => match e.scram_verifier() {
                Some(v) => scram(scram::authenticate(stream, v, true).await?),
                None => {
                    return Err(unavailable(
                        "SCRAM-SHA-256",
                        "the stored password is an MD5 hash",
                    ))
                }
            },
        },
        AuthMethod::Md5 => match entry {
            None => (
                md5::authenticate(stream, &mock_md5_hash(user), false).await?,
                None,
            ),
            Some(e) => match (e.md5_hash(), e.scram_verifier()) {
                (Some(h), _) => (md5::authenticate(stream, &h, true).await?, None),
                // As in PostgreSQL: with only a SCRAM verifier stored, "md5" runs SCRAM,
                // since an MD5 response cannot be checked against a verifier.
                (None, Some(v)) => scram(scram::authenticate(stream, v, true).await?),
                (None, None) => return Err(unavailable("MD5", "no usable stored password")),
            },
        },
    };
    if passed {
        Ok(Authenticated { scram_keys })
    } else {
        Err(AuthError::PasswordFailed {
            user: user.to_owned(),
        })
    }
}
