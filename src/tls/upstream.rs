//! TLS to the upstream server: the SSLRequest exchange and a rustls client configured for
//! the URL's `sslmode` (no verification, chain only, or chain and host name).

use super::binding;
use super::params::SslMode;
use super::stream::ServerStream;
use crate::config::Upstream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How server connections are secured; built once from the upstream URL.
pub struct UpstreamTls {
    mode: SslMode,
    connector: Option<TlsConnector>,
}

/// A connected stream and, for TLS, the `tls-server-end-point` binding data.
pub struct Secured {
    pub stream: ServerStream,
    pub end_point: Option<Vec<u8>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .finish()
    }
}

impl UpstreamTls {
    pub fn new(up: &Upstream) -> Result<UpstreamTls, String> {
        let mut mode = up.sslmode;
        let root_file = up.sslrootcert.as_deref().filter(|r| *r != "system");
        if mode == SslMode::Require && root_file.is_some() {
            // libpq: with a root certificate file present, require verifies the chain.
            mode = SslMode::VerifyCa;
        }
        if !mode.tries_tls() {
            return Ok(UpstreamTls {
                mode,
                connector: None,
            });
        }
        let provider = super::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(roots(up.sslrootcert.as_deref())?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| format!("--upstream sslrootcert: {e}"))?;
                if mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                        .with_no_client_auth()
                }
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth(),
        };
        // Every host's name is checked now, so a connect never fails on one.
        for h in &up.hosts {
            ServerName::try_from(h.host.clone())
                .map_err(|e| format!("--upstream host {:?}: {e}", h.host))?;
        }
        Ok(UpstreamTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// Negotiates TLS on a fresh connection to `host` as the mode asks (verify-full checks
    /// the certificate against that name).
    pub async fn secure(&self, mut tcp: TcpStream, host: &str) -> Result<Secured, String> {
        let Some(connector) = &self.connector else {
            return Ok(Secured {
                stream: ServerStream::Plain(tcp),
                end_point: None,
            });
        };
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&8i32.to_be_bytes());
        req[4..].copy_from_slice(&crate::protocol::SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&req)
            .await
            .map_err(|e| format!("sending SSLRequest: {e}"))?;
        // Exactly one byte: anything after 'S' must come through the TLS layer.
        let answer = tcp
            .read_u8()
            .await
            .map_err(|e| format!("reading the SSLRequest answer: {e}"))?;
        match answer {
            b'S' => {}
            b'N' if self.mode == SslMode::Prefer => {
                return Ok(Secured {
                    stream: ServerStream::Plain(tcp),
                    end_point: None,
                })
            }
            b'N' => {
                return Err(format!(
                    "server does not support TLS, but sslmode={} requires it",
                    self.mode.as_str()
                ))
            }
            other => {
                return Err(format!(
                    "unexpected answer {:?} to SSLRequest",
                    char::from(other)
                ))
            }
        }
        let tls = connector
            .connect(
                ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?,
                tcp,
            )
            .await
            .map_err(|e| format!("TLS handshake (sslmode={}): {e}", self.mode.as_str()))?;
        let end_point = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| match binding::tls_server_end_point(c) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "no channel binding data");
                    None
                }
            });
        Ok(Secured {
            stream: ServerStream::Tls(Box::new(tls)),
            end_point,
        })
    }
}

fn roots(sslrootcert: Option<&str>) -> Result<RootCertStore, String> {
    match sslrootcert.filter(|r| *r != "system") {
        Some(path) => super::root_store("--upstream sslrootcert", std::path::Path::new(path)),
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "--upstream: no system root certificates found; name a file with sslrootcert"
                        .into(),
                );
            }
            Ok(store)
        }
    }
}

/// sslmode=verify-ca: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // The name is checked only after the chain verified.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// sslmode=prefer/require without a root certificate: encryption without authentication
/// of the server, as libpq does. The handshake signature is still checked, so the peer
/// holds the key of the certificate it sent (which channel binding relies on).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
