//! Connects the admin HTTP API to the running proxy.

use crate::admin::{AdminBackend, AdminConfig};
use crate::state::Shared;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

struct Backend(Arc<Shared>);

impl AdminBackend for Backend {
    fn pools(&self) -> serde_json::Value {
        let sh = &self.0;
        let pools: Vec<_> = sh
            .pools
            .all()
            .into_iter()
            .map(|p| {
                let st = p.pool.state();
                serde_json::json!({
                    "pool": &*p.label,
                    "database": p.database,
                    "user": p.user,
                    "route": p.route.as_str(),
                    "server_connections": st.connections,
                    "server_idle": st.idle_connections,
                    "server_active": st.connections.saturating_sub(st.idle_connections),
                })
            })
            .collect();
        let t = sh.pools.topology();
        let hosts: Vec<_> = t
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                serde_json::json!({
                    "host": h.label,
                    "role": h.role().as_str(),
                    "lag_bytes": t.lag_bytes(i),
                    "server_connections": h.open_connections(),
                })
            })
            .collect();
        serde_json::json!({
            "upstream": sh.config().upstream.label(),
            "hosts": hosts,
            "upstream_up": sh.upstream_up.load(Ordering::Relaxed),
            "clients": {
                "total": sh.clients_total.load(Ordering::Relaxed),
                "active": sh.clients_active.load(Ordering::Relaxed),
                "waiting": sh.clients_waiting.load(Ordering::Relaxed),
            },
            "guard": sh.guard.snapshot(),
            "pools": pools,
        })
    }

    fn upstream_ready(&self) -> bool {
        self.0.upstream_up.load(Ordering::Relaxed)
    }

    fn paused(&self) -> bool {
        self.0.guard.is_paused()
    }

    fn pause(&self) {
        self.0.pause();
    }

    fn resume(&self) {
        self.0.resume();
    }

    fn reload(&self) -> Result<(), String> {
        self.0.reload()
    }

    fn refresh_gauges(&self) {
        self.0.export_gauges();
    }
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, prometheus: PrometheusHandle) {
    let token = shared.config().admin_token.clone();
    let mut rx = shared.shutdown_rx();
    let shutdown = async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    if let Err(e) = crate::admin::serve(
        listener,
        Arc::new(Backend(shared)),
        prometheus,
        AdminConfig { token },
        shutdown,
    )
    .await
    {
        tracing::error!(error = %e, "admin server stopped");
    }
}
