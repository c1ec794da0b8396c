//! Shared helpers for integration tests: throwaway PostgreSQL clusters and a fault-injecting
//! TCP shim. Each test binary uses a different subset.
#![allow(dead_code, unused_imports)]

pub mod pg;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod raw_simple;
pub mod recorder;
pub mod shim;
pub mod steps;

pub use pg::{connect, try_connect, HostAuth, TempPostgres};
pub use process::{LogOpts, ProxyProcess};
pub use proxy::TestProxy;
pub use raw_simple::{PgError, Raw};
pub use shim::{FaultShim, Mode};

/// Lifts the soft open-file limit to the hard limit: hundreds of concurrent clients plus the
/// in-process proxy's sockets can exceed a default soft limit of 1024.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Starts a throwaway cluster from async code (initdb and pg_ctl block).
pub async fn cluster() -> TempPostgres {
    tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .expect("start cluster")
}

/// Starts a throwaway cluster with extra postgresql.conf settings.
pub async fn cluster_with(settings: &[(&str, &str)]) -> TempPostgres {
    let mut b = TempPostgres::builder();
    for (k, v) in settings {
        b = b.setting(k, v);
    }
    tokio::task::spawn_blocking(move || b.spawn())
        .await
        .expect("start cluster")
}
