//! The client-facing acceptor and certificate loading shared by both sides.

use crate::config::{Config, TlsMode};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::{Arc, Once};
use tokio_rustls::TlsAcceptor;

/// The crypto provider every TLS config uses (ring: no C toolchain needed beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Another part of the process may have installed one already; ours is then unused.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the client side offers: the acceptor and whether plaintext is still allowed.
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    pub mode: TlsMode,
}

impl ClientTls {
    /// Reads the configured certificate, key and client CA. `None` when TLS is disabled.
    pub fn load(cfg: &Config) -> Result<Option<Arc<ClientTls>>, String> {
        if cfg.tls_mode == TlsMode::Disable {
            return Ok(None);
        }
        let (Some(cert_path), Some(key_path)) = (&cfg.tls_cert, &cfg.tls_key) else {
            return Err(format!(
                "--tls-mode {}: needs --tls-cert and --tls-key",
                cfg.tls_mode.as_str()
            ));
        };
        let certs = load_certs("--tls-cert", cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| format!("--tls-key {}: {}", key_path.display(), pem_error(&e)))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &cfg.tls_client_ca {
            Some(ca_path) => {
                let roots = root_store("--tls-client-ca", ca_path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca_path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let server = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "--tls-key {}: does not match the certificate in --tls-cert {}",
                key_path.display(),
                cert_path.display()
            ),
            e => format!("--tls-key {}: {e}", key_path.display()),
        })?;
        Ok(Some(Arc::new(ClientTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            mode: cfg.tls_mode,
        })))
    }
}

/// All certificates of a PEM file; at least one.
pub fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {}", path.display(), pem_error(&e)))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// A root store holding every certificate of a PEM file.
pub fn root_store(flag: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(flag, path)? {
        roots
            .add(c)
            .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("invalid PEM: {other:?}"),
    }
}
