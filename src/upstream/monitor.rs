//! Role checks: one task per host with its own connection (never a pool's), asking whether
//! the host is in recovery and where its WAL stands, on a short interval.

use super::{Role, Topology};
use crate::auth::upstream::{upstream_startup_bound, Binding};
use crate::config::{HostAddr, Upstream};
use crate::metrics as m;
use crate::protocol;
use crate::tls::upstream::UpstreamTls;
use crate::tls::ServerStream;
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Position in bytes: what the primary has written, what a standby has replayed.
const CHECK_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END \
      - '0/0'::pg_lsn)::bigint";

pub struct MonitorSettings {
    pub interval: Duration,
    pub connect_timeout: Duration,
}

/// Starts one checking task per host of a multi-host upstream (none for a single host).
pub fn spawn(
    topology: Arc<Topology>,
    upstream: Upstream,
    tls: Arc<UpstreamTls>,
    settings: MonitorSettings,
) -> Vec<tokio::task::JoinHandle<()>> {
    if topology.is_single() {
        return Vec::new();
    }
    let settings = Arc::new(settings);
    let upstream = Arc::new(upstream);
    (0..topology.hosts.len())
        .map(|idx| {
            tokio::spawn(watch_host(
                topology.clone(),
                idx,
                upstream.clone(),
                tls.clone(),
                settings.clone(),
            ))
        })
        .collect()
}

/// Closes the circuit breaker when a different host becomes the one primary: what opened it
/// was the old primary failing, and the new one has just answered a check.
pub async fn follow_primary(topology: Arc<Topology>, guard: Arc<crate::guard::Guard>) {
    if topology.is_single() {
        return;
    }
    let mut changes = topology.subscribe();
    let mut last = None;
    while changes.changed().await.is_ok() {
        let now = match topology.candidates(super::Route::Primary) {
            Ok(c) if c.len() == 1 && topology.host(c[0]).role() == Role::Primary => Some(c[0]),
            _ => None,
        };
        if now.is_some() && now != last {
            if last.is_some() {
                tracing::info!(host = %topology.host(now.unwrap_or(0)).label, "new primary; circuit breaker reset");
            }
            guard.reset_breaker();
            last = now;
        }
    }
}

async fn watch_host(
    topology: Arc<Topology>,
    idx: usize,
    upstream: Arc<Upstream>,
    tls: Arc<UpstreamTls>,
    settings: Arc<MonitorSettings>,
) {
    let label = topology.host(idx).label.clone();
    let mut conn: Option<ServerStream> = None;
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An answer slower than this counts as no answer: a host that hangs is not serving.
    let answer_within = (settings.interval * 4).max(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if conn.is_none() {
            match tokio::time::timeout(
                settings.connect_timeout,
                open(&upstream, idx, &topology, &tls),
            )
            .await
            {
                Ok(Ok(s)) => conn = Some(s),
                Ok(Err(e)) => {
                    tracing::debug!(host = %label, error = %e, "role check: cannot connect");
                    topology.observe(idx, Role::Down, None);
                }
                Err(_) => topology.observe(idx, Role::Down, None),
            }
        }
        let Some(s) = conn.as_mut() else {
            export(&topology, idx);
            continue;
        };
        match tokio::time::timeout(answer_within, check(s)).await {
            Ok(Ok((role, lsn))) => topology.observe(idx, role, Some(lsn)),
            Ok(Err(e)) => {
                tracing::debug!(host = %label, error = %e, "role check failed");
                conn = None;
                topology.observe(idx, Role::Down, None);
            }
            Err(_) => {
                conn = None;
                topology.observe(idx, Role::Down, None);
            }
        }
        export(&topology, idx);
    }
}

fn export(topology: &Topology, idx: usize) {
    let h = topology.host(idx);
    let role = h.role();
    let g = |name: &'static str, v: f64| metrics::gauge!(name, "host" => h.label.clone()).set(v);
    g(m::HOST_UP, if role == Role::Down { 0.0 } else { 1.0 });
    g(
        m::HOST_PRIMARY,
        if role == Role::Primary { 1.0 } else { 0.0 },
    );
    g(
        m::HOST_LAG_BYTES,
        topology.lag_bytes(idx).map_or(0.0, |l| l as f64),
    );
}

async fn open(
    upstream: &Upstream,
    idx: usize,
    topology: &Topology,
    tls: &UpstreamTls,
) -> Result<ServerStream, String> {
    login_url_user(upstream, &topology.host(idx).addr, tls, "pgsluice-monitor").await
}

/// A connection to `host` logged in as the upstream URL's own user (the health check and
/// the role checks), not a pool's.
pub async fn login_url_user(
    upstream: &Upstream,
    host: &HostAddr,
    tls: &UpstreamTls,
    application_name: &str,
) -> Result<ServerStream, String> {
    let tcp = TcpStream::connect(host.connect_addr())
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let secured = tls.secure(tcp, &host.host).await?;
    let binding = Binding {
        tls: secured.stream.is_tls(),
        end_point: secured.end_point,
        mode: upstream.channel_binding,
    };
    let mut s = secured.stream;
    let db = upstream
        .dbname
        .clone()
        .unwrap_or_else(|| upstream.user.clone());
    let params = [
        ("user", upstream.user.as_str()),
        ("database", db.as_str()),
        ("application_name", application_name),
    ];
    upstream_startup_bound(&mut s, &params, upstream.password.as_deref(), &binding)
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

async fn check(s: &mut ServerStream) -> Result<(Role, u64), String> {
    let mut b = BytesMut::new();
    protocol::query(&mut b, CHECK_SQL);
    s.write_all(&b).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut found = None;
    let mut failure = None;
    loop {
        let (tag, body) = protocol::read_message(s, 1 << 16)
            .await
            .map_err(|e| e.to_string())?;
        match tag {
            b'D' => found = parse_row(&body),
            b'E' => {
                let f = protocol::parse_error_fields(&body);
                failure = Some(format!("{} {}", f.code, f.message));
            }
            b'Z' => break,
            _ => {}
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    found.ok_or_else(|| "role check returned no row".to_string())
}

/// (in recovery, lsn) from the check's one row.
fn parse_row(body: &[u8]) -> Option<(Role, u64)> {
    let mut cols = Vec::with_capacity(2);
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2;
    for _ in 0..n.max(0) {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            cols.push(None);
        } else {
            let v = body.get(at..at + len as usize)?;
            at += len as usize;
            cols.push(Some(std::str::from_utf8(v).ok()?));
        }
    }
    let role = match cols.first()?.as_deref()? {
        "t" => Role::Standby,
        "f" => Role::Primary,
        _ => return None,
    };
    let lsn = cols
        .get(1)
        .copied()
        .flatten()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .max(0) as u64;
    Some((role, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn rows_read_as_roles() {
        assert_eq!(
            parse_row(&row(&[Some("f"), Some("123")])),
            Some((Role::Primary, 123))
        );
        // A standby that has replayed nothing yet reports NULL.
        assert_eq!(
            parse_row(&row(&[Some("t"), None])),
            Some((Role::Standby, 0))
        );
        assert_eq!(parse_row(&row(&[Some("x"), Some("1")])), None);
        assert_eq!(parse_row(&[0, 2, 0]), None);
    }
}
