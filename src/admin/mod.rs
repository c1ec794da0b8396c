//! HTTP admin API and Prometheus endpoint. (Interim: replaced by the full module.)
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;

pub trait AdminBackend: Send + Sync + 'static {
    fn pools(&self) -> serde_json::Value;
    fn upstream_ready(&self) -> bool;
    fn paused(&self) -> bool;
    fn pause(&self);
    fn resume(&self);
    fn reload(&self) -> Result<(), String>;
}
pub struct AdminConfig {
    pub token: Option<String>,
}
pub async fn serve(
    _listener: tokio::net::TcpListener,
    _backend: Arc<dyn AdminBackend>,
    _metrics: PrometheusHandle,
    _cfg: AdminConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    shutdown.await;
    Ok(())
}
