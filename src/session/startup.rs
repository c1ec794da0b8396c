//! A client's first packets: TLS/GSS negotiation (declined for now), cancel requests,
//! the StartupMessage and authentication.

use crate::auth::{self, AuthMethod, UserStore};
use crate::cancel::CancelRegistry;
use crate::protocol::{self, ProtocolError, Severity, StartupPacket};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the client asked for.
pub struct StartupInfo {
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    /// Tracked session parameters from the startup packet: (index, value) as sent.
    pub params: Vec<(usize, String)>,
}

pub enum Startup {
    Session(StartupInfo),
    /// A CancelRequest connection, already handled.
    Cancelled,
}

/// Error to send to the client before closing: (SQLSTATE, message).
pub struct Refusal(pub &'static str, pub String);

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Self {
        Refusal("08P01", format!("pgsluice: invalid startup packet: {e}"))
    }
}

pub async fn read_startup(
    client: &mut TcpStream,
    cancels: &CancelRegistry,
) -> Result<Startup, Refusal> {
    // Each refusal of TLS/GSS is followed by a fresh packet; two of each is already odd.
    for _ in 0..4 {
        match protocol::read_startup(client).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                client
                    .write_all(b"N")
                    .await
                    .map_err(|e| Refusal("08006", e.to_string()))?;
            }
            StartupPacket::Cancel { pid, secret } => {
                let outcome = cancels.cancel(pid, secret).await;
                tracing::debug!(?outcome, pid, "cancel request");
                return Ok(Startup::Cancelled);
            }
            StartupPacket::Startup { params } => {
                let get = |k: &str| StartupPacket::param(&params, k).filter(|v| !v.is_empty());
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
                let tracked =
                    super::params::from_startup(&params).map_err(|(c, m)| Refusal(c, m))?;
                return Ok(Startup::Session(StartupInfo {
                    user: user.to_string(),
                    database: get("database").unwrap_or(user).to_string(),
                    application_name: get("application_name").map(str::to_string),
                    params: tracked,
                }));
            }
        }
    }
    Err(Refusal(
        "08P01",
        "pgsluice: too many encryption requests".into(),
    ))
}

pub async fn authenticate(
    client: &mut TcpStream,
    method: AuthMethod,
    user: &str,
    users: &UserStore,
) -> Result<(), Refusal> {
    auth::authenticate_client(client, method, user, users)
        .await
        .map_err(|e| Refusal(e.sqlstate(), e.client_message()))
}

/// Sends a FATAL error and flushes it; the caller then drops the connection.
pub async fn send_fatal(client: &mut TcpStream, code: &str, message: &str) {
    let mut b = BytesMut::new();
    protocol::error_response(&mut b, Severity::Fatal, code, message, None);
    let _ = client.write_all(&b).await;
    let _ = client.shutdown().await;
}
