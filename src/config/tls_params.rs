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

/// The client-side `--tls-mode` after its default (allow with a certificate, else disable),
/// checked against the files given.
pub fn client_mode(
    cert: bool,
    key: bool,
    client_ca: bool,
    mode: Option<TlsMode>,
) -> Result<TlsMode, String> {
    let mode = mode.unwrap_or(if cert {
        TlsMode::Allow
    } else {
        TlsMode::Disable
    });
    if cert != key {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if mode != TlsMode::Disable && !cert {
        return Err(format!(
            "--tls-mode {}: needs --tls-cert and --tls-key",
            mode.as_str()
        ));
    }
    if client_ca && !cert {
        return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(args: &[&str]) -> anyhow::Result<Config> {
        let mut v = vec!["pgsluice"];
        v.extend_from_slice(args);
        Config::from_args(v)
    }

    #[test]
    fn tls_flags_are_validated() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.tls_mode, TlsMode::Disable);
        let c = cfg(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]).unwrap();
        assert_eq!(c.tls_mode, TlsMode::Allow);
        let e = cfg(&["--tls-mode", "require"]).unwrap_err().to_string();
        assert!(
            e.contains("--tls-mode require") && e.contains("--tls-cert"),
            "{e}"
        );
        let e = cfg(&["--tls-cert", "/c.pem"]).unwrap_err().to_string();
        assert!(e.contains("--tls-key"), "{e}");
        assert!(cfg(&["--tls-client-ca", "/ca.pem"]).is_err());
        let c = Config::from_toml_str(
            "tls-cert = \"/c.pem\"\ntls_key = \"/k.pem\"\ntls-mode = \"require\"\n",
        )
        .unwrap();
        assert_eq!(c.tls_mode, TlsMode::Require);
    }
}
