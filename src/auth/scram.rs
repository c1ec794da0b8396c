//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it: the user name
//! comes from the startup packet, not from the SCRAM messages, and channel binding is not
//! offered because the client connection is not TLS.

use super::verifier::{hmac_sha256, sha256, ScramVerifier};
use super::{read_client_response, send_auth, AuthError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

pub const MECHANISM: &str = "SCRAM-SHA-256";
const SERVER_NONCE_LEN: usize = 18;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

fn malformed(what: &str) -> AuthError {
    AuthError::Protocol(format!("malformed SCRAM message: {what}"))
}

/// The parts of the client-first-message the rest of the exchange needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClientFirst {
    /// "n,," or "y,,": must come back base64-encoded in the client-final `c=` attribute.
    pub gs2_header: String,
    /// client-first-message-bare, part of the AuthMessage.
    pub bare: String,
    pub nonce: String,
}

fn printable_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

impl ClientFirst {
    pub fn parse(msg: &str) -> Result<Self, AuthError> {
        let (flag, rest) = msg
            .split_once(',')
            .ok_or_else(|| malformed("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => {
                return Err(AuthError::Protocol(
                    "channel binding is not supported: the connection does not use TLS".into(),
                ))
            }
            _ => return Err(malformed("unexpected channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or_else(|| malformed("GS2 header not terminated"))?;
        if !authzid.is_empty() {
            return Err(AuthError::Protocol(
                "client uses an authorization identity, which is not supported".into(),
            ));
        }
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(AuthError::Protocol(
                "client requires an unsupported SCRAM extension".into(),
            ));
        }
        // The name is ignored: PostgreSQL authenticates the startup packet's user.
        if !user.starts_with("n=") {
            return Err(malformed("expected user name attribute"));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| printable_nonce(n))
            .ok_or_else(|| malformed("expected a printable nonce attribute"))?;
        Ok(ClientFirst {
            gs2_header: format!("{flag},,"),
            bare: bare.to_owned(),
            nonce: nonce.to_owned(),
        })
    }
}

/// Server state between server-first and client-final.
pub(crate) struct Exchange<'a> {
    verifier: &'a ScramVerifier,
    first: ClientFirst,
    /// client nonce + server nonce
    nonce: String,
    server_first: String,
}

impl<'a> Exchange<'a> {
    pub fn new(verifier: &'a ScramVerifier, first: ClientFirst) -> Self {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{}{}", first.nonce, B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Exchange {
            verifier,
            first,
            nonce,
            server_first,
        }
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks client-final; returns server-final-message (`v=<signature>`) when the proof is
    /// right, None when it is not. `genuine` is false for the stand-in verifier of an unknown
    /// user: every check still runs, but the proof never counts as right.
    pub fn finish(&self, client_final: &str, genuine: bool) -> Result<Option<Passed>, AuthError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or_else(|| malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| malformed("expected channel-binding attribute"))?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| malformed("channel-binding attribute is not base64"))?;
        if cbind != self.first.gs2_header.as_bytes() {
            return Err(AuthError::Protocol(
                "SCRAM channel-binding check failed: header differs from the first message".into(),
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| malformed("expected nonce attribute"))?;
        if !bool::from(nonce.as_bytes().ct_eq(self.nonce.as_bytes())) {
            return Err(AuthError::Protocol("SCRAM nonce does not match".into()));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| malformed("proof is not base64"))?;
        let proof: [u8; 32] = proof
            .try_into()
            .map_err(|_| malformed("proof has the wrong length"))?;

        let auth_message = format!(
            "{},{},{}",
            self.first.bare, self.server_first, without_proof
        );
        let client_signature = hmac_sha256(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let matches = sha256(&client_key).ct_eq(&self.verifier.stored_key);
        if !(bool::from(matches) && genuine) {
            return Ok(None);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(Some(Passed {
            server_final: format!("v={}", B64.encode(server_signature)),
            keys: ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            },
        }))
    }
}

/// A proof that checked out.
pub(crate) struct Passed {
    pub server_final: String,
    /// What the proof revealed: enough to log in to a server holding the same verifier.
    pub keys: ScramKeys,
}

/// A SCRAM ClientKey (recovered from a client's proof) with the verifier's ServerKey: what a
/// proxy needs to authenticate to the upstream as that client without its password, when
/// the upstream holds the same verifier (same salt and iterations).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

// Password-equivalent: never in logs.
impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// Splits a SASLInitialResponse body into mechanism and client-first-message.
fn parse_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), AuthError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed("SASLInitialResponse lacks a mechanism name"))?;
    let (mechanism, rest) = (&body[..nul], &body[nul + 1..]);
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("SASLInitialResponse too short"))?;
    let len = i32::from_be_bytes(len_bytes);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed("SASLInitialResponse data length mismatch"));
    }
    Ok((mechanism, data))
}

fn utf8(b: &[u8]) -> Result<&str, AuthError> {
    std::str::from_utf8(b).map_err(|_| malformed("not UTF-8"))
}

/// Runs the whole SASL exchange; Ok(None) means a wrong password, Ok(Some) carries the keys
/// the proof revealed. `genuine` as in [`Exchange::finish`].
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    verifier: &ScramVerifier,
    genuine: bool,
) -> Result<Option<ScramKeys>, AuthError> {
    let mut mechanisms = Vec::with_capacity(MECHANISM.len() + 2);
    mechanisms.extend_from_slice(MECHANISM.as_bytes());
    mechanisms.extend_from_slice(&[0, 0]);
    send_auth(stream, AUTH_SASL, &mechanisms).await?;

    let body = read_client_response(stream).await?;
    let (mechanism, data) = parse_initial_response(&body)?;
    if mechanism != MECHANISM.as_bytes() {
        return Err(AuthError::Protocol(
            "client selected an invalid SASL authentication mechanism".into(),
        ));
    }
    let exchange = Exchange::new(verifier, ClientFirst::parse(utf8(data)?)?);
    send_auth(
        stream,
        AUTH_SASL_CONTINUE,
        exchange.server_first().as_bytes(),
    )
    .await?;

    let body = read_client_response(stream).await?;
    match exchange.finish(utf8(&body)?, genuine)? {
        Some(p) => {
            send_auth(stream, AUTH_SASL_FINAL, p.server_final.as_bytes()).await?;
            Ok(Some(p.keys))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_scram_client_first_parsing() {
        let f = ClientFirst::parse("n,,n=,r=abc").unwrap();
        assert_eq!(f.gs2_header, "n,,");
        assert_eq!(f.bare, "n=,r=abc");
        assert_eq!(f.nonce, "abc");
        assert_eq!(
            ClientFirst::parse("y,,n=x,r=q,e=1").unwrap().gs2_header,
            "y,,"
        );
        let p = ClientFirst::parse("p=tls-server-end-point,,n=,r=abc").unwrap_err();
        assert!(p.client_message().contains("TLS"));
        for bad in [
            "",
            "n",
            "x,,n=,r=a",
            "n,a=bob,n=,r=a",
            "n,,m=ext,n=,r=a",
            "n,,r=a",
            "n,,n=",
            "n,,n=,r=",
            "n,,n=,r=a b",
        ] {
            let e = ClientFirst::parse(bad).unwrap_err();
            assert_eq!(e.sqlstate(), "08P01", "{bad:?}");
        }
    }

    #[test]
    fn auth_scram_initial_response_parsing() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse_initial_response(&body).unwrap(),
            (&b"SCRAM-SHA-256"[..], &b"abc"[..])
        );
        body.push(b'x');
        assert!(parse_initial_response(&body).is_err());
        assert!(parse_initial_response(b"SCRAM").is_err());
        assert!(parse_initial_response(b"SCRAM\0\xff\xff\xff\xff").is_err());
    }
}
