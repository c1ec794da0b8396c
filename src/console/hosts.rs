//! `SHOW HOSTS`: each upstream host, the role its latest check found and how far behind the
//! primary a standby is.

use super::rows::{ResultSet, Ty, Val};
use crate::state::Shared;
use crate::upstream::Route;
use Ty::{Int4, Int8, Text};

pub fn hosts(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("host", Text),
        ("port", Int4),
        ("role", Text),
        ("lag_bytes", Int8),
        ("checked_ms_ago", Int8),
        ("server_connections", Int4),
        ("role_changes", Int8),
        ("takes_writes", Int4),
    ]);
    let t = shared.pools.topology();
    let writer = t
        .candidates(Route::Primary)
        .ok()
        .and_then(|c| c.first().copied());
    for (i, h) in t.hosts.iter().enumerate() {
        rs.row(vec![
            h.addr.host.as_str().into(),
            Val::Int(h.addr.port as i64),
            h.role().as_str().into(),
            t.lag_bytes(i).map_or(Val::Null, Val::UInt),
            t.checked_ago(i)
                .map_or(Val::Null, |d| Val::Int(d.as_millis() as i64)),
            h.open_connections().into(),
            Val::UInt(h.role_changes.load(std::sync::atomic::Ordering::Relaxed)),
            (writer == Some(i)).into(),
        ]);
    }
    rs
}
