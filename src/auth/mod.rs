//! Client-facing and upstream authentication. (Interim: trust only; replaced by the full module.)
use crate::protocol::{self, ProtocolError};
use bytes::BytesMut;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    Trust,
    Md5,
    #[value(name = "scram-sha-256")]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Clone, Default)]
pub struct UserStore;
pub struct UserEntry {
    pub name: String,
}
impl UserEntry {
    pub fn plain_password(&self) -> Option<&str> {
        None
    }
}
impl UserStore {
    pub fn empty() -> Self {
        UserStore
    }
    pub fn load(_path: &Path) -> Result<Self, String> {
        Err("users file not supported yet".into())
    }
    pub fn get(&self, _user: &str) -> Option<&UserEntry> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}
impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            AuthError::Protocol(_) => "08P01",
        }
    }
    pub fn client_message(&self) -> String {
        self.to_string()
    }
}

pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    _stream: &mut S,
    method: AuthMethod,
    user: &str,
    _users: &UserStore,
) -> Result<(), AuthError> {
    match method {
        AuthMethod::Trust => Ok(()),
        _ => Err(AuthError::Failed(user.to_string())),
    }
}

pub mod upstream {
    use super::*;
    pub struct UpstreamStartup {
        pub params: Vec<(String, String)>,
        pub pid: i32,
        pub secret: i32,
    }
    #[derive(Debug, thiserror::Error)]
    pub enum UpstreamAuthError {
        #[error("{0}")]
        Io(#[from] std::io::Error),
        #[error("{severity}: {message} ({code})")]
        Server {
            code: String,
            message: String,
            severity: String,
        },
        #[error("protocol: {0}")]
        Protocol(String),
        #[error("password required")]
        PasswordRequired,
        #[error("unsupported method {0}")]
        UnsupportedMethod(String),
    }
    impl From<ProtocolError> for UpstreamAuthError {
        fn from(e: ProtocolError) -> Self {
            match e {
                ProtocolError::Io(e) => UpstreamAuthError::Io(e),
                e => UpstreamAuthError::Protocol(e.to_string()),
            }
        }
    }
    pub async fn upstream_startup<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        params: &[(&str, &str)],
        password: Option<&str>,
    ) -> Result<UpstreamStartup, UpstreamAuthError> {
        let mut buf = BytesMut::new();
        protocol::startup_message(&mut buf, params);
        stream.write_all(&buf).await?;
        let mut out = UpstreamStartup {
            params: vec![],
            pid: 0,
            secret: 0,
        };
        loop {
            let (tag, body) = protocol::read_message(stream, 1 << 20).await?;
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    match code {
                        0 => {}
                        3 => {
                            let pw = password.ok_or(UpstreamAuthError::PasswordRequired)?;
                            let mut m = BytesMut::new();
                            m.extend_from_slice(b"p");
                            m.extend_from_slice(&((pw.len() + 5) as i32).to_be_bytes());
                            m.extend_from_slice(pw.as_bytes());
                            m.extend_from_slice(&[0]);
                            stream.write_all(&m).await?;
                        }
                        c => return Err(UpstreamAuthError::UnsupportedMethod(c.to_string())),
                    }
                }
                b'S' => {
                    let (k, rest) = protocol::startup::take_cstr(&body)?;
                    let (v, _) = protocol::startup::take_cstr(rest)?;
                    out.params.push((k.into(), v.into()));
                }
                b'K' => {
                    out.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    out.secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                }
                b'Z' => return Ok(out),
                b'E' => {
                    let f = protocol::parse_error_fields(&body);
                    return Err(UpstreamAuthError::Server {
                        code: f.code,
                        message: f.message,
                        severity: f.severity,
                    });
                }
                _ => {}
            }
        }
    }
}

/// Interim.
pub fn scram_verifier_for(_password: &str) -> String {
    String::new()
}
