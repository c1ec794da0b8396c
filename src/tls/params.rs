//! The TLS settings' vocabulary: the client side's `--tls-mode`, and the upstream URL's
//! `sslmode` and `channel_binding` with libpq's meanings.

use clap::ValueEnum;
use serde::Deserialize;

/// Whether clients may, or must, use TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// SSLRequest is answered 'N'.
    Disable,
    /// TLS for clients that ask, plaintext for the others.
    Allow,
    /// A plaintext StartupMessage is refused.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        }
    }
}

/// The upstream URL's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Plaintext (libpq would retry with TLS if the server refused plaintext; we do not).
    Allow,
    /// TLS when the server accepts it, else plaintext; the certificate is not checked.
    Prefer,
    /// TLS or nothing; the certificate is not checked (unless `sslrootcert` names a file,
    /// as in libpq: then it is `verify-ca`).
    Require,
    /// TLS with the chain verified against the root certificates; any host name.
    VerifyCa,
    /// TLS with the chain and the host name verified.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether an SSLRequest is sent at all.
    pub fn tries_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }
}

/// The upstream URL's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    /// Never use channel binding.
    Disable,
    /// SCRAM-SHA-256-PLUS when the connection is TLS and the server offers it.
    #[default]
    Prefer,
    /// Only SCRAM-SHA-256-PLUS is accepted as the server's authentication.
    Require,
}

impl ChannelBindingMode {
    pub fn parse(s: &str) -> Option<ChannelBindingMode> {
        Some(match s {
            "disable" => ChannelBindingMode::Disable,
            "prefer" => ChannelBindingMode::Prefer,
            "require" => ChannelBindingMode::Require,
            _ => return None,
        })
    }
}
