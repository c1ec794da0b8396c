//! The `--upstream` URL: one or several hosts (libpq style, `h1:5432,h2:5433`), the login,
//! TLS settings and which host a connection may go to (`target_session_attrs`).

use super::{ChannelBindingMode, SslMode};
use anyhow::{anyhow, bail, Result};

/// One database server of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    pub host: String,
    pub port: u16,
}

impl HostAddr {
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// What `TcpStream::connect` takes.
    pub fn connect_addr(&self) -> (&str, u16) {
        (self.host.as_str(), self.port)
    }
}

/// Which hosts the default (read-write) route may use, as libpq's `target_session_attrs`.
/// `any` takes the first host that answers; `read-write`/`primary` only a primary, the
/// default when several hosts are given (libpq's default is `any`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetAttrs {
    Any,
    Primary,
}

/// Where a server connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// In the order given: with `any`, the first live one wins.
    pub hosts: Vec<HostAddr>,
    pub target: TargetAttrs,
    pub user: String,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    /// Root certificates for verify-ca/verify-full: a PEM file, or "system" (the default).
    pub sslrootcert: Option<String>,
    pub channel_binding: ChannelBindingMode,
}

/// A host as listed in the URL, with its port when one was given.
type Listed = (String, Option<u16>);

/// Splits `scheme://[userinfo@]hostlist[/path][?query]` into the URL with the host list
/// replaced by the first host (what `url` can parse) and the host list itself.
fn split_hosts(url: &str) -> Result<(String, Vec<Listed>)> {
    let Some(scheme_end) = url.find("://") else {
        bail!("--upstream {url:?}: expected postgres://host[:port][,host[:port]...]/database");
    };
    let rest = &url[scheme_end + 3..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let (userinfo, hostlist) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let mut hosts = Vec::new();
    for part in hostlist.split(',') {
        let (host, port) = if let Some(v6) = part.strip_prefix('[') {
            let close = v6
                .find(']')
                .ok_or_else(|| anyhow!("--upstream {url:?}: unclosed '[' in host {part:?}"))?;
            let after = &v6[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => bail!("--upstream {url:?}: bad host {part:?}"),
            };
            (v6[..close].to_string(), port)
        } else {
            match part.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (part.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| anyhow!("--upstream {url:?}: bad port {p:?}"))?,
            ),
            None => None,
        };
        if host.is_empty() && hostlist.contains(',') {
            bail!("--upstream {url:?}: empty host in the host list");
        }
        hosts.push((host, port));
    }
    let first = hostlist.split(',').next().unwrap_or("");
    let single = format!(
        "{}{userinfo}{first}{}",
        &url[..scheme_end + 3],
        &rest[auth_end..]
    );
    Ok((single, hosts))
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream> {
        let (single, listed) = split_hosts(url)?;
        let u = url::Url::parse(&single).map_err(|e| anyhow!("--upstream {url:?}: {e}"))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            bail!("--upstream {url:?}: scheme must be postgres:// or postgresql://");
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut user = decode(u.username());
        let mut password = u.password().map(decode);
        let mut dbname = Some(decode(u.path().trim_start_matches('/'))).filter(|d| !d.is_empty());
        let mut ports: Vec<u16> = Vec::new();
        let mut hosts_param: Option<Vec<String>> = None;
        let mut sslmode = SslMode::Disable;
        let mut sslrootcert = None;
        let mut channel_binding = ChannelBindingMode::Prefer;
        let mut target = None;
        for (k, v) in u.query_pairs() {
            match &*k {
                "sslmode" => {
                    sslmode = SslMode::parse(&v).ok_or_else(|| {
                        anyhow!("--upstream: sslmode={v}: expected disable, allow, prefer, require, verify-ca or verify-full")
                    })?
                }
                "sslrootcert" => sslrootcert = Some(v.into_owned()),
                "channel_binding" => {
                    channel_binding = ChannelBindingMode::parse(&v).ok_or_else(|| {
                        anyhow!("--upstream: channel_binding={v}: expected disable, prefer or require")
                    })?
                }
                "target_session_attrs" => {
                    target = Some(match &*v {
                        "any" => TargetAttrs::Any,
                        "read-write" | "primary" => TargetAttrs::Primary,
                        other => bail!(
                            "--upstream: target_session_attrs={other}: expected any, read-write or primary \
                             (reads go to standbys through the NAME@ro database instead)"
                        ),
                    })
                }
                "user" => user = v.into_owned(),
                "password" => password = Some(v.into_owned()),
                "dbname" => dbname = Some(v.into_owned()),
                "host" => hosts_param = Some(v.split(',').map(str::to_string).collect()),
                "port" => {
                    ports = v
                        .split(',')
                        .map(|p| p.trim().parse::<u16>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| anyhow!("--upstream: bad port {v:?}"))?
                }
                "application_name" | "connect_timeout" => {}
                other => bail!("--upstream {url:?}: unsupported parameter {other:?}"),
            }
        }
        let mut listed: Vec<Listed> = match hosts_param {
            Some(h) => h.into_iter().map(|h| (h, None)).collect(),
            None => listed,
        };
        if ports.len() > 1 && ports.len() != listed.len() {
            bail!(
                "--upstream: {} ports for {} hosts (give one port, or one per host)",
                ports.len(),
                listed.len()
            );
        }
        let mut hosts = Vec::with_capacity(listed.len());
        for (i, (host, port)) in listed.drain(..).enumerate() {
            let host = decode(&host);
            let host = if host.is_empty() {
                "127.0.0.1".to_string()
            } else {
                host
            };
            let port = port
                .or_else(|| ports.get(i).or(ports.first()).copied())
                .unwrap_or(5432);
            let h = HostAddr { host, port };
            if hosts.contains(&h) {
                bail!("--upstream: host {} is listed twice", h.label());
            }
            hosts.push(h);
        }
        if hosts.len() > 64 {
            bail!("--upstream: at most 64 hosts");
        }
        if channel_binding == ChannelBindingMode::Require && !sslmode.tries_tls() {
            bail!(
                "--upstream: channel_binding=require needs TLS (sslmode={} sends no SSLRequest)",
                sslmode.as_str()
            );
        }
        if user.is_empty() {
            user = "postgres".into();
        }
        // Several hosts and no word on it: the default route is the primary's, so a write
        // never goes to a standby because the primary is down.
        let target = target.unwrap_or(if hosts.len() > 1 {
            TargetAttrs::Primary
        } else {
            TargetAttrs::Any
        });
        Ok(Upstream {
            hosts,
            target,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            channel_binding,
        })
    }

    /// The hosts as given, comma-separated (the `upstream` label of metrics and logs).
    pub fn label(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(HostAddr::label).collect();
        hosts.join(",")
    }

    pub fn first(&self) -> &HostAddr {
        &self.hosts[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url() {
        let u = Upstream::parse("postgres://app:s%40cret@db.internal:5433/shop?sslmode=prefer")
            .unwrap();
        assert_eq!(u.hosts.len(), 1);
        assert_eq!(u.first().host, "db.internal");
        assert_eq!(u.first().port, 5433);
        assert_eq!(u.user, "app");
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(u.dbname.as_deref(), Some("shop"));
        assert_eq!(u.sslmode, SslMode::Prefer);
        assert_eq!(u.target, TargetAttrs::Any);
        let u = Upstream::parse(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem&channel_binding=require",
        )
        .unwrap();
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(u.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(u.channel_binding, ChannelBindingMode::Require);
        let e = Upstream::parse("postgres://h/db?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=sometimes"), "{e}");
        assert!(Upstream::parse("postgres://h/db?channel_binding=require").is_err());
    }

    #[test]
    fn several_hosts_libpq_style() {
        let u = Upstream::parse(
            "postgres://u:p%2Cw@h1:5432,h2,[::1]:5434/app?target_session_attrs=read-write",
        )
        .unwrap();
        let got: Vec<String> = u.hosts.iter().map(HostAddr::label).collect();
        assert_eq!(got, ["h1:5432", "h2:5432", "[::1]:5434"]);
        assert_eq!(u.password.as_deref(), Some("p,w"));
        assert_eq!(u.dbname.as_deref(), Some("app"));
        assert_eq!(u.target, TargetAttrs::Primary);
        assert_eq!(u.label(), "h1:5432,h2:5432,[::1]:5434");

        let u = Upstream::parse("postgres://a,b/app?port=6000,6001").unwrap();
        assert_eq!(
            u.target,
            TargetAttrs::Primary,
            "several hosts: primary by default"
        );
        let got: Vec<String> = u.hosts.iter().map(HostAddr::label).collect();
        assert_eq!(got, ["a:6000", "b:6001"]);
        let u =
            Upstream::parse("postgres:///app?host=x,y&port=7000&target_session_attrs=any").unwrap();
        assert_eq!(u.target, TargetAttrs::Any);
        let got: Vec<String> = u.hosts.iter().map(HostAddr::label).collect();
        assert_eq!(got, ["x:7000", "y:7000"]);
    }

    #[test]
    fn bad_host_lists_name_the_problem() {
        for (url, want) in [
            ("postgres://a,b,c/app?port=1,2", "2 ports for 3 hosts"),
            ("postgres://a:1,a:1/app", "listed twice"),
            ("postgres://a:x/app", "bad port"),
            ("postgres://a,,b/app", "empty host"),
            ("postgres://[::1/app", "unclosed"),
            ("postgres://a/app?target_session_attrs=standby", "NAME@ro"),
        ] {
            let e = Upstream::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
    }
}
