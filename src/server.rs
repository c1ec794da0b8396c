//! The running proxy: the accept loop, background checks and graceful shutdown, around the
//! shared state of `state`.

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::guard::Guard;
use crate::metrics as m;
use crate::pool;
use crate::tls::upstream::UpstreamTls;
use crate::tls::ClientTls;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::state::{guard_config, load_users, Shared};

/// A started proxy.
pub struct ProxyHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets clients finish their transactions up to the shutdown timeout,
    /// then stops everything.
    pub async fn shutdown(self) {
        self.shared.begin_shutdown();
        self.accept.abort();
        let deadline = Instant::now() + self.shared.config().shutdown_timeout;
        while self.shared.clients_total.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.clients_total.load(Ordering::Relaxed);
        if left > 0 {
            warn!(
                clients = left,
                "shutdown deadline passed; closing remaining clients"
            );
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Binds the listeners and starts serving.
pub async fn start(cfg: Config) -> Result<ProxyHandle> {
    let prometheus = m::install();
    let users = load_users(&cfg)?;
    let client_tls = ClientTls::load(&cfg).map_err(anyhow::Error::msg)?;
    let upstream_tls = Arc::new(UpstreamTls::new(&cfg.upstream).map_err(anyhow::Error::msg)?);
    let guard = Guard::new(guard_config(&cfg));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", cfg.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener = match cfg.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("--admin-listen {a}: cannot bind"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let (shutdown, _) = watch::channel(false);
    let shared = Arc::new(Shared::new(
        cfg,
        users,
        client_tls,
        upstream_tls,
        guard,
        shutdown,
    ));
    // Every series exists from the first scrape, before the first health check completes.
    shared.export_gauges();
    let mut tasks = vec![
        tokio::spawn(health_loop(shared.clone())),
        m::spawn_upkeep(prometheus.clone()),
    ];
    {
        let cfg = shared.config();
        tasks.push(tokio::spawn(crate::upstream::monitor::follow_primary(
            shared.pools.topology().clone(),
            shared.guard.clone(),
        )));
        tasks.extend(crate::upstream::monitor::spawn(
            shared.pools.topology().clone(),
            cfg.upstream.clone(),
            shared.pools.tls().clone(),
            crate::upstream::monitor::MonitorSettings {
                interval: cfg.host_check_interval,
                connect_timeout: cfg.connect_timeout,
            },
        ));
    }
    if let Some(l) = admin_listener {
        tasks.push(tokio::spawn(crate::admin_backend::serve(
            l,
            shared.clone(),
            prometheus,
        )));
    }
    let accept = tokio::spawn(accept_loop(listener, shared.clone()));
    info!(%addr, admin = ?admin_addr, upstream = %shared.config().upstream.label(), "pgsluice listening");
    Ok(ProxyHandle {
        addr,
        admin_addr,
        shared,
        accept,
        tasks,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let max = shared.config().max_client_conn;
        if shared.clients_total.fetch_add(1, Ordering::AcqRel) >= max {
            shared.clients_total.fetch_sub(1, Ordering::AcqRel);
            tokio::spawn(refuse_client(sock, shared.client_tls()));
            continue;
        }
        let sh = shared.clone();
        // No tracing span per client: it cost ~2.7 KB per idle client and an enter/exit on
        // every poll; session log lines name their identity (and pool) themselves.
        tokio::spawn(async move {
            crate::session::run(sock, sh.clone()).await;
            sh.clients_total.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Too many clients: answer the startup with 53300 and close.
async fn refuse_client(sock: TcpStream, tls: Option<Arc<ClientTls>>) {
    use crate::handshake as startup;
    let cancels = CancelRegistry::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let _ = tokio::time::timeout_at(deadline, async {
        if let Some((mut client, _)) =
            startup::open(sock, tls.as_deref(), &cancels, deadline, |_| Ok(Vec::new())).await
        {
            startup::send_fatal(&mut client, "53300", "pgsluice: too many clients already").await;
        }
    })
    .await;
}

/// Checks the upstream on an interval (readiness, breaker) and publishes gauges.
async fn health_loop(shared: Arc<Shared>) {
    let mut was_up: Option<bool> = None;
    let mut trimmer = crate::memtrim::Trimmer::default();
    loop {
        if trimmer.observe(shared.clients_total.load(Ordering::Relaxed)) {
            debug!("client count fell well below its peak; returned freed memory");
        }
        let cfg = shared.config();
        let topology = shared.pools.topology();
        // Several hosts: the role checks already watch each one; up means the primary
        // route has somewhere to go.
        let ok = if topology.is_single() {
            pool::probe(
                &cfg.upstream,
                shared.pools.tls(),
                cfg.connect_timeout.min(cfg.health_interval * 3),
            )
            .await
        } else {
            topology.primary_route_up().map(|_| Duration::ZERO)
        };
        let up = ok.is_ok();
        shared.upstream_up.store(up, Ordering::Relaxed);
        match &ok {
            Ok(_) => shared.guard.record_success(),
            Err(_) => shared.guard.record_failure(),
        }
        if was_up != Some(up) {
            match &ok {
                Ok(t) => info!(latency_ms = t.as_millis() as u64, "upstream is up"),
                Err(e) => warn!(error = %e, "upstream health check failed"),
            }
            was_up = Some(up);
        }
        shared.export_gauges();
        tokio::time::sleep(cfg.health_interval).await;
    }
}
