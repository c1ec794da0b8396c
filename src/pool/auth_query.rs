//! auth_query: users missing from the users file are looked up on the upstream, as
//! PgBouncer does, by running a query as `--auth-user` that returns their stored secret
//! (SCRAM verifier or MD5 hash). Answers, including "no such user", are cached for a TTL, so a
//! known and an unknown user cost the same. No plaintext password is needed: the client's
//! SCRAM proof yields the keys the proxy then logs in upstream with.

use crate::auth::upstream::{upstream_login, Binding, Credentials};
use crate::auth::{Secret, UserEntry};
use crate::config::Upstream;
use crate::protocol;
use crate::tls::upstream::UpstreamTls;
use bytes::{BufMut, BytesMut};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// PgBouncer's default query.
pub const DEFAULT_QUERY: &str =
    "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1";

/// Most cached answers kept; beyond it the oldest half is dropped (bounds memory against
/// clients trying many made-up names).
const MAX_CACHED: usize = 10_000;

pub struct AuthQuery {
    user: String,
    creds: Credentials,
    query: String,
    /// Database to run the query in; the client's own when unset.
    dbname: Option<String>,
    ttl: Duration,
    timeout: Duration,
    upstream: Upstream,
    topology: Arc<crate::upstream::Topology>,
    tls: Arc<UpstreamTls>,
    cache: Mutex<HashMap<String, (Instant, Option<UserEntry>)>>,
}

pub struct AuthQueryConfig {
    pub user: String,
    pub creds: Credentials,
    pub query: String,
    pub dbname: Option<String>,
    pub ttl: Duration,
    pub timeout: Duration,
}

impl AuthQuery {
    pub fn new(
        cfg: AuthQueryConfig,
        upstream: Upstream,
        topology: Arc<crate::upstream::Topology>,
        tls: Arc<UpstreamTls>,
    ) -> Self {
        AuthQuery {
            user: cfg.user,
            creds: cfg.creds,
            query: cfg.query,
            dbname: cfg.dbname,
            ttl: cfg.ttl,
            timeout: cfg.timeout,
            upstream,
            topology,
            tls,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The user's entry, `None` when the upstream has no such user (or no password for it).
    /// Errors mean the lookup itself failed (upstream down, bad auth user or query).
    pub async fn lookup(&self, user: &str, database: &str) -> Result<Option<UserEntry>, String> {
        if let Some((at, e)) = self.cache.lock().get(user) {
            if at.elapsed() < self.ttl {
                return Ok(e.clone());
            }
        }
        let db = self.dbname.as_deref().unwrap_or(database);
        let secret = tokio::time::timeout(self.timeout, self.query_secret(user, db))
            .await
            .map_err(|_| "auth query timed out".to_string())??;
        let entry = match secret {
            Some(s) => Some(UserEntry::new(
                user,
                Secret::parse(&s)
                    .map_err(|e| format!("auth query returned an unusable secret: {e}"))?,
            )),
            None => None,
        };
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            let mut ages: Vec<Instant> = cache.values().map(|(at, _)| *at).collect();
            ages.sort();
            let cut = ages[ages.len() / 2];
            cache.retain(|_, (at, _)| *at > cut);
        }
        cache.insert(user.to_string(), (Instant::now(), entry.clone()));
        Ok(entry)
    }

    async fn query_secret(&self, user: &str, db: &str) -> Result<Option<String>, String> {
        // The primary when one is known (any live host would do: roles are replicated).
        let idx = self
            .topology
            .candidates(crate::upstream::Route::Primary)
            .ok()
            .and_then(|c| c.first().copied())
            .unwrap_or(0);
        let host = &self.topology.host(idx).addr;
        let tcp = TcpStream::connect(host.connect_addr())
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let secured = self.tls.secure(tcp, &host.host).await?;
        let binding = Binding {
            tls: secured.stream.is_tls(),
            end_point: secured.end_point,
            mode: self.upstream.channel_binding,
        };
        let mut s = secured.stream;
        let params = [
            ("user", self.user.as_str()),
            ("database", db),
            ("application_name", "pgsluice-auth-query"),
        ];
        upstream_login(&mut s, &params, &self.creds, &binding)
            .await
            .map_err(|e| format!("auth user login failed: {e}"))?;
        let mut b = BytesMut::new();
        extended_query(&mut b, &self.query, user);
        s.write_all(&b).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut secret = None;
        let mut failure = None;
        loop {
            let (tag, body) = protocol::read_message(&mut s, 1 << 20)
                .await
                .map_err(|e| e.to_string())?;
            match tag {
                b'D' if secret.is_none() => secret = Some(secret_column(&body)?),
                b'E' => {
                    let f = protocol::parse_error_fields(&body);
                    failure = Some(format!("auth query failed: {} {}", f.code, f.message));
                }
                b'Z' => break,
                _ => {}
            }
        }
        let mut b = BytesMut::new();
        protocol::terminate(&mut b);
        let _ = s.write_all(&b).await;
        let _ = s.shutdown().await;
        match failure {
            Some(f) => Err(f),
            None => Ok(secret.flatten()),
        }
    }
}

/// Parse/Bind/Execute/Sync with the user name as the one text parameter (never spliced into
/// the SQL text).
fn extended_query(buf: &mut BytesMut, query: &str, user: &str) {
    protocol::message(buf, b'P', |b| {
        protocol::put_cstr(b, "");
        protocol::put_cstr(b, query);
        b.put_i16(0);
    });
    protocol::message(buf, b'B', |b| {
        protocol::put_cstr(b, "");
        protocol::put_cstr(b, "");
        b.put_i16(0);
        b.put_i16(1);
        b.put_i32(user.len() as i32);
        b.extend_from_slice(user.as_bytes());
        b.put_i16(0);
    });
    protocol::message(buf, b'E', |b| {
        protocol::put_cstr(b, "");
        b.put_i32(1);
    });
    protocol::message(buf, b'S', |_| {});
}

/// The secret from a DataRow: the second column (PgBouncer's shape: name, secret), or the
/// only one. NULL means the user has no password.
fn secret_column(body: &[u8]) -> Result<Option<String>, String> {
    let bad = || "auth query: malformed row".to_string();
    let n = i16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let want = if n >= 2 { 1 } else { 0 };
    let mut at = 2;
    for i in 0..n.max(0) as usize {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        at += 4;
        let value = if len < 0 {
            None
        } else {
            let v = body.get(at..at + len as usize).ok_or_else(bad)?;
            at += len as usize;
            Some(String::from_utf8_lossy(v).into_owned())
        };
        if i == want {
            return Ok(value);
        }
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    #[test]
    fn secret_is_the_second_column_or_the_only_one() {
        assert_eq!(
            secret_column(&row(&[Some("app"), Some("md5abc")])).unwrap(),
            Some("md5abc".into())
        );
        assert_eq!(
            secret_column(&row(&[Some("only")])).unwrap(),
            Some("only".into())
        );
        assert_eq!(secret_column(&row(&[Some("app"), None])).unwrap(), None);
        assert!(secret_column(&[0, 2, 0]).is_err());
    }

    #[test]
    fn the_user_name_is_a_parameter() {
        let mut b = BytesMut::new();
        extended_query(&mut b, DEFAULT_QUERY, "x'; DROP TABLE t; --");
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains(DEFAULT_QUERY));
        assert_eq!(&b[b.len() - 5..], &[b'S', 0, 0, 0, 4]);
    }
}
