//! A client's first packets: TLS negotiation (GSS encryption is declined), cancel requests,
//! the StartupMessage and authentication.

use crate::auth::{self, AuthMethod};
use crate::cancel::CancelRegistry;
use crate::config::TlsMode;
use crate::protocol::{self, ProtocolError, Severity, StartupPacket};
use crate::tls::{ClientStream, ClientTls};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

/// What the client asked for.
pub struct StartupInfo {
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    /// Tracked session parameters from the startup packet: (index, value) as sent.
    pub params: Vec<(usize, String)>,
}

/// Reads the startup packet's parameters into tracked ones, or refuses them with (SQLSTATE,
/// message): what is tracked is the session's vocabulary, so the caller passes it in.
pub type TrackParams =
    fn(&[(String, String)]) -> Result<Vec<(usize, String)>, (&'static str, String)>;

/// Error to send to the client before closing: (SQLSTATE, message).
pub struct Refusal(pub &'static str, pub String);

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Self {
        Refusal("08P01", format!("pgsluice: invalid startup packet: {e}"))
    }
}

/// Runs the startup phase up to a valid StartupMessage, upgrading to TLS when the client
/// asks and `tls` allows it. Refusals are sent to the client here; `None` means the
/// connection is done (refused, cancel request handled, or closed).
pub async fn open(
    sock: TcpStream,
    tls: Option<&ClientTls>,
    cancels: &CancelRegistry,
    deadline: Instant,
    track: TrackParams,
) -> Option<(ClientStream, StartupInfo)> {
    let mut client = ClientStream::Plain(sock);
    // Each refusal of TLS/GSS is followed by a fresh packet; two of each is already odd.
    for _ in 0..4 {
        let packet = match timeout_at(deadline, protocol::read_startup(&mut client)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) if e.is_eof() => return None,
            Ok(Err(e)) => {
                let Refusal(code, msg) = e.into();
                debug!(code, %msg, "startup refused");
                send_fatal(&mut client, code, &msg).await;
                return None;
            }
            Err(_) => {
                send_fatal(&mut client, "08P01", "pgsluice: startup timed out").await;
                return None;
            }
        };
        match packet {
            // A second negotiation inside TLS is a protocol violation: there is no
            // plaintext left to answer it in.
            StartupPacket::SslRequest | StartupPacket::GssEncRequest if client.is_tls() => {
                debug!("encryption request inside TLS; closing");
                return None;
            }
            StartupPacket::SslRequest if tls.is_some() => {
                let acceptor = tls.map(|t| t.acceptor.clone())?;
                let ClientStream::Plain(mut tcp) = client else {
                    return None;
                };
                if tcp.write_all(b"S").await.is_err() {
                    return None;
                }
                // Whatever follows 'S' is read by rustls, so plaintext sent ahead of the
                // handshake cannot pass as protected.
                // Boxed: the handshake state is large and would otherwise enlarge every
                // session's future, plaintext ones included.
                match timeout_at(deadline, Box::pin(acceptor.accept(tcp))).await {
                    Ok(Ok(s)) => client = ClientStream::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        debug!(error = %e, "client TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        debug!("client TLS handshake timed out");
                        return None;
                    }
                }
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if client.write_all(b"N").await.is_err() {
                    return None;
                }
            }
            StartupPacket::Terminate => {
                debug!("Terminate before startup; closing");
                return None;
            }
            StartupPacket::Cancel { pid, secret } => {
                // Plaintext cancels are accepted even when TLS is required, as PostgreSQL
                // does: libpq sends them unencrypted.
                let outcome = cancels.cancel(pid, secret).await;
                debug!(?outcome, pid, "cancel request");
                return None;
            }
            StartupPacket::Startup { params } => {
                if !client.is_tls() && tls.is_some_and(|t| t.mode == TlsMode::Require) {
                    send_fatal(&mut client, "28000", "pgsluice: TLS is required").await;
                    return None;
                }
                match startup_info(&params, track) {
                    Ok(info) => return Some((client, info)),
                    Err(Refusal(code, msg)) => {
                        debug!(code, %msg, "startup refused");
                        send_fatal(&mut client, code, &msg).await;
                        return None;
                    }
                }
            }
        }
    }
    send_fatal(
        &mut client,
        "08P01",
        "pgsluice: too many encryption requests",
    )
    .await;
    None
}

fn startup_info(params: &[(String, String)], track: TrackParams) -> Result<StartupInfo, Refusal> {
    let get = |k: &str| StartupPacket::param(params, k).filter(|v| !v.is_empty());
    let Some(user) = get("user") else {
        return Err(Refusal(
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    };
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(Refusal(
            "0A000",
            "pgsluice: replication connections are not supported".into(),
        ));
    }
    let tracked = track(params).map_err(|(c, m)| Refusal(c, m))?;
    Ok(StartupInfo {
        user: user.to_string(),
        database: get("database").unwrap_or(user).to_string(),
        application_name: get("application_name").map(str::to_string),
        params: tracked,
    })
}

pub async fn authenticate(
    client: &mut ClientStream,
    method: AuthMethod,
    user: &str,
    entry: Option<&auth::UserEntry>,
) -> Result<auth::Authenticated, Refusal> {
    auth::authenticate_entry(client, method, user, entry)
        .await
        .map_err(|e| Refusal(e.sqlstate(), e.client_message()))
}

/// Writes bytes and flushes them (TLS may hold written bytes until flushed).
pub async fn send(client: &mut ClientStream, bytes: &[u8]) -> std::io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

/// Sends a FATAL error and flushes it; the caller then drops the connection.
pub async fn send_fatal(client: &mut ClientStream, code: &str, message: &str) {
    let mut b = BytesMut::new();
    protocol::error_response(&mut b, Severity::Fatal, code, message, None);
    let _ = send(client, &b).await;
    let _ = client.shutdown().await;
}
