//! Running the proxy as a process: signals for shutdown and reload.

use crate::config::Config;
use crate::server;
use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP; then shuts down gracefully.
pub async fn run_until_signal(cfg: Config) -> Result<()> {
    let handle = server::start(cfg).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = handle.shared().stop_requested() => break,
            _ = hup.recv() => {
                if let Err(e) = handle.shared().reload() {
                    error!(error = %e, "reload rejected; keeping the running configuration");
                }
            }
        }
    }
    info!("shutting down: no new clients; waiting for running transactions");
    handle.shutdown().await;
    info!("stopped");
    Ok(())
}
