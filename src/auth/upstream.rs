//! Logging in to the upstream PostgreSQL: StartupMessage, whatever password exchange the
//! server asks for, then the server's start-up report up to ReadyForQuery.

use super::scram::ScramKeys;
use super::scram_client::KeyedScram;
use crate::config::ChannelBindingMode;
use crate::protocol::{self, ProtocolError, MAX_AUTH_MESSAGE_LEN};
use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// What the server told us while starting the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamStartup {
    /// ParameterStatus pairs in arrival order.
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub secret: i32,
    /// How the server had us authenticate (for logs and diagnostics).
    pub auth: UpstreamAuth,
}

/// The password exchange the server chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// No password asked (trust, peer, ...).
    #[default]
    None,
    Cleartext,
    Md5,
    ScramSha256,
    /// SCRAM with `tls-server-end-point` channel binding.
    ScramSha256Plus,
}

/// What the connection offers for SCRAM channel binding.
#[derive(Debug, Clone, Default)]
pub struct Binding {
    /// The connection is TLS.
    pub tls: bool,
    /// `tls-server-end-point` data of the server's certificate (TLS only).
    pub end_point: Option<Vec<u8>>,
    pub mode: ChannelBindingMode,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamAuthError {
    #[error("i/o talking to upstream: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream {severity} {code}: {message}")]
    Server {
        code: String,
        message: String,
        severity: String,
    },
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream asks for a password but none is configured")]
    PasswordRequired,
    #[error("upstream asks for an unsupported authentication method: {0}")]
    UnsupportedMethod(String),
    #[error("channel_binding=require, but {0}")]
    ChannelBindingRequired(&'static str),
}

impl From<ProtocolError> for UpstreamAuthError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(io) => UpstreamAuthError::Io(io),
            other => UpstreamAuthError::Protocol(other.to_string()),
        }
    }
}

fn proto(msg: impl Into<String>) -> UpstreamAuthError {
    UpstreamAuthError::Protocol(msg.into())
}

/// Bounds the start-up conversation: a real server sends a few dozen messages at most.
const MAX_STARTUP_MESSAGES: usize = 10_000;

fn be_i32(b: &[u8]) -> Result<i32, UpstreamAuthError> {
    b.get(..4)
        .and_then(|s| s.try_into().ok())
        .map(i32::from_be_bytes)
        .ok_or_else(|| proto("message too short"))
}

fn cstr(b: &[u8]) -> Result<(String, &[u8]), UpstreamAuthError> {
    let nul = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| proto("missing string terminator"))?;
    Ok((
        String::from_utf8_lossy(&b[..nul]).into_owned(),
        &b[nul + 1..],
    ))
}

fn method_name(code: i32) -> String {
    match code {
        2 => "Kerberos V5".into(),
        6 => "SCM credentials".into(),
        7 | 8 => "GSSAPI".into(),
        9 => "SSPI".into(),
        other => format!("authentication request code {other}"),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, buf: &BytesMut) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

/// Sends the StartupMessage with `params` (must include "user" and "database"), answers the
/// server's authentication request (trust, cleartext, MD5, SCRAM-SHA-256), then reads
/// ParameterStatus/BackendKeyData/NoticeResponse until ReadyForQuery. An ErrorResponse from
/// the server comes back as [`UpstreamAuthError::Server`].
pub async fn upstream_startup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
    password: Option<&str>,
) -> Result<UpstreamStartup, UpstreamAuthError> {
    upstream_startup_bound(stream, params, password, &Binding::default()).await
}

/// What the proxy can prove upstream on a user's behalf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    None,
    /// Serves every method.
    Password(String),
    /// PostgreSQL's stored "md5..." form: answers MD5 only.
    Md5(String),
    /// From a client's SCRAM proof: answers SCRAM only, against the same verifier.
    Scram(ScramKeys),
}

impl Credentials {
    fn password(&self) -> Option<&str> {
        match self {
            Credentials::Password(p) => Some(p),
            _ => None,
        }
    }
}

/// [`upstream_startup`] on a connection that may offer channel binding: SCRAM-SHA-256-PLUS
/// is chosen when the server offers it over TLS (unless `channel_binding=disable`).
pub async fn upstream_startup_bound<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
    password: Option<&str>,
    binding: &Binding,
) -> Result<UpstreamStartup, UpstreamAuthError> {
    let creds = password.map_or(Credentials::None, |p| Credentials::Password(p.into()));
    upstream_login(stream, params, &creds, binding).await
}

/// [`upstream_startup_bound`] with any kind of [`Credentials`].
pub async fn upstream_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
    creds: &Credentials,
    binding: &Binding,
) -> Result<UpstreamStartup, UpstreamAuthError> {
    let password = creds.password();
    let mut keyed: Option<KeyedScram> = None;
    let require_cb = binding.mode == ChannelBindingMode::Require;
    let user = params
        .iter()
        .find(|(k, _)| *k == "user")
        .map(|(_, v)| *v)
        .ok_or_else(|| proto("startup parameters lack \"user\""))?;
    let mut buf = BytesMut::with_capacity(256);
    protocol::startup_message(&mut buf, params);
    send(stream, &buf).await?;

    let mut out = UpstreamStartup::default();
    let mut scram: Option<ScramSha256> = None;
    let mut authenticated = false;
    for _ in 0..MAX_STARTUP_MESSAGES {
        let (tag, body) = protocol::read_message(stream, MAX_AUTH_MESSAGE_LEN).await?;
        match tag {
            b'R' => {
                if authenticated {
                    return Err(proto("authentication request after AuthenticationOk"));
                }
                let code = be_i32(&body)?;
                let payload = &body[4..];
                buf.clear();
                match code {
                    0 => {
                        // A SASL exchange must have ended with a verified server signature,
                        // or a fake server could skip proving it knows the password.
                        if scram.is_some() || keyed.is_some() {
                            return Err(proto("server skipped the SCRAM final message"));
                        }
                        if require_cb && out.auth != UpstreamAuth::ScramSha256Plus {
                            return Err(UpstreamAuthError::ChannelBindingRequired(
                                "the server authenticated us without channel binding",
                            ));
                        }
                        authenticated = true;
                        continue;
                    }
                    3 | 5 if require_cb => {
                        return Err(UpstreamAuthError::ChannelBindingRequired(
                            "the server asks for a password without channel binding",
                        ))
                    }
                    3 => {
                        let pw = password.ok_or(UpstreamAuthError::PasswordRequired)?;
                        frontend::password_message(pw.as_bytes(), &mut buf)?;
                        out.auth = UpstreamAuth::Cleartext;
                    }
                    5 => {
                        let salt: [u8; 4] = payload
                            .try_into()
                            .map_err(|_| proto("bad MD5 salt length"))?;
                        let hash = match creds {
                            Credentials::Password(pw) => {
                                md5_hash(user.as_bytes(), pw.as_bytes(), salt)
                            }
                            Credentials::Md5(stored) => super::md5::expected_response(stored, salt),
                            _ => return Err(UpstreamAuthError::PasswordRequired),
                        };
                        frontend::password_message(hash.as_bytes(), &mut buf)?;
                        out.auth = UpstreamAuth::Md5;
                    }
                    10 => {
                        let keys = match creds {
                            Credentials::Scram(k) => Some(k),
                            _ => None,
                        };
                        if password.is_none() && keys.is_none() {
                            return Err(UpstreamAuthError::PasswordRequired);
                        }
                        let offers =
                            |m: &str| payload.split(|&b| b == 0).any(|x| x == m.as_bytes());
                        let plus_offered = offers(sasl::SCRAM_SHA_256_PLUS);
                        let plus = match &binding.end_point {
                            Some(ep)
                                if plus_offered && binding.mode != ChannelBindingMode::Disable =>
                            {
                                Some(ep.clone())
                            }
                            _ => None,
                        };
                        if require_cb && plus.is_none() {
                            return Err(UpstreamAuthError::ChannelBindingRequired(
                                if binding.tls {
                                    "the server does not offer SCRAM-SHA-256-PLUS"
                                } else {
                                    "the connection to the server is not TLS"
                                },
                            ));
                        }
                        if plus.is_none() && !offers(sasl::SCRAM_SHA_256) {
                            return Err(UpstreamAuthError::UnsupportedMethod(format!(
                                "SASL mechanisms {}",
                                String::from_utf8_lossy(payload).replace('\0', " ").trim()
                            )));
                        }
                        // The GS2 flag: "p" binds; "y" says we could bind but the server
                        // offered no PLUS (a server that did would detect a downgrade);
                        // "n" without TLS, when disabled, or when the data is missing.
                        let (mechanism, cb) = match plus {
                            Some(ep) => (
                                sasl::SCRAM_SHA_256_PLUS,
                                ChannelBinding::tls_server_end_point(ep),
                            ),
                            None if binding.tls
                                && !plus_offered
                                && binding.mode != ChannelBindingMode::Disable =>
                            {
                                (sasl::SCRAM_SHA_256, ChannelBinding::unrequested())
                            }
                            None => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                        };
                        match (password, keys) {
                            (Some(pw), _) => {
                                let s = ScramSha256::new(pw.as_bytes(), cb);
                                frontend::sasl_initial_response(mechanism, s.message(), &mut buf)?;
                                scram = Some(s);
                            }
                            (None, Some(k)) => {
                                let (gs2, data) = match &binding.end_point {
                                    Some(ep) if mechanism == sasl::SCRAM_SHA_256_PLUS => {
                                        ("p=tls-server-end-point,,", ep.as_slice())
                                    }
                                    _ if binding.tls
                                        && !plus_offered
                                        && binding.mode != ChannelBindingMode::Disable =>
                                    {
                                        ("y,,", &[][..])
                                    }
                                    _ => ("n,,", &[][..]),
                                };
                                let k = KeyedScram::new(k.clone(), gs2, data);
                                let first = k.client_first(gs2);
                                frontend::sasl_initial_response(
                                    mechanism,
                                    first.as_bytes(),
                                    &mut buf,
                                )?;
                                keyed = Some(k);
                            }
                            (None, None) => unreachable!("checked above"),
                        }
                        out.auth = if mechanism == sasl::SCRAM_SHA_256_PLUS {
                            UpstreamAuth::ScramSha256Plus
                        } else {
                            UpstreamAuth::ScramSha256
                        };
                    }
                    11 if keyed.is_some() => {
                        let k = keyed.as_mut().expect("guarded");
                        let fin = k
                            .client_final(payload)
                            .map_err(|e| proto(format!("SCRAM server-first: {e}")))?;
                        frontend::sasl_response(fin.as_bytes(), &mut buf)?;
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| proto("SASL continue without a SASL exchange"))?;
                        s.update(payload)
                            .map_err(|e| proto(format!("SCRAM server-first: {e}")))?;
                        frontend::sasl_response(s.message(), &mut buf)?;
                    }
                    12 if keyed.is_some() => {
                        let k = keyed.take().expect("guarded");
                        k.verify(payload)
                            .map_err(|e| proto(format!("SCRAM server signature: {e}")))?;
                        continue;
                    }
                    12 => {
                        let mut s = scram
                            .take()
                            .ok_or_else(|| proto("SASL final without a SASL exchange"))?;
                        s.finish(payload)
                            .map_err(|e| proto(format!("SCRAM server signature: {e}")))?;
                        continue;
                    }
                    other => return Err(UpstreamAuthError::UnsupportedMethod(method_name(other))),
                }
                send(stream, &buf).await?;
            }
            b'E' => {
                let f = protocol::parse_error_fields(&body);
                return Err(UpstreamAuthError::Server {
                    code: f.code,
                    message: f.message,
                    severity: f.severity,
                });
            }
            b'S' if authenticated => {
                let (name, rest) = cstr(&body)?;
                let (value, _) = cstr(rest)?;
                out.params.push((name, value));
            }
            b'K' if authenticated => {
                out.pid = be_i32(&body)?;
                out.secret = be_i32(body.get(4..).unwrap_or_default())?;
            }
            b'N' => {
                let f = protocol::parse_error_fields(&body);
                tracing::debug!(code = %f.code, message = %f.message, "upstream notice during startup");
            }
            b'Z' if authenticated => return Ok(out),
            other => {
                return Err(proto(format!(
                    "unexpected message type '{}' during startup",
                    char::from(other).escape_default()
                )))
            }
        }
    }
    Err(proto("server sent too many start-up messages"))
}
