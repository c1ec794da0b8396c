//! `pgsluice demo`: a throwaway PostgreSQL with pgsluice in front of it, for a first look
//! without any setup; and `hash-password` for the users file.

use crate::config::{Config, Flags};
use anyhow::{anyhow, bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tokio::signal::unix::{signal, SignalKind};

/// Where initdb, pg_ctl and postgres live: PATH, else `pg_config --bindir`, else Debian's
/// versioned directories.
pub fn find_pg_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
        v.sort();
        dirs.extend(v.into_iter().rev());
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(bin: &Path, as_user: Option<&str>) -> Command {
    match as_user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct TempCluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    pg_ctl: PathBuf,
    user: Option<String>,
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = pg_command(&self.pg_ctl, self.user.as_deref())
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn start_cluster(port: u16) -> Result<TempCluster> {
    let initdb = find_pg_bin("initdb").ok_or_else(|| anyhow!("initdb not found: install PostgreSQL server binaries (e.g. apt-get install postgresql)"))?;
    let pg_ctl = find_pg_bin("pg_ctl").ok_or_else(|| anyhow!("pg_ctl not found"))?;
    let dir = tempfile::Builder::new()
        .prefix("pgsluice-demo-")
        .tempdir()?;
    let root = unsafe { libc::geteuid() } == 0;
    let user = root.then(|| "postgres".to_string());
    if root {
        let st = Command::new("chown")
            .arg("postgres")
            .arg(dir.path())
            .status()?;
        if !st.success() {
            bail!("running as root needs a 'postgres' user to own the demo cluster");
        }
    }
    let data = dir.path().join("data");
    let out = pg_command(&initdb, user.as_deref())
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
        dir.path().display()
    );
    let cluster = TempCluster {
        data: data.clone(),
        pg_ctl: pg_ctl.clone(),
        user: user.clone(),
        _dir: dir,
    };
    let log = cluster._dir.path().join("postgres.log");
    let out = pg_command(&pg_ctl, user.as_deref())
        .arg("-D")
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(&log)
        .args(["-w", "start"])
        .output()
        .context("running pg_ctl")?;
    if !out.status.success() {
        bail!(
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(cluster)
}

pub async fn run(port: u16, mut flags: Flags) -> Result<()> {
    let pg_port = free_port()?;
    let cluster = tokio::task::spawn_blocking(move || start_cluster(pg_port)).await??;
    flags.upstream = Some(format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"));
    flags
        .listen
        .get_or_insert_with(|| format!("127.0.0.1:{port}"));
    flags
        .admin_listen
        .get_or_insert_with(|| "127.0.0.1:0".into());
    let cfg = Config::from_flags(flags)?;
    let handle = crate::server::start(cfg).await?;
    let addr = handle.addr();
    println!();
    println!("pgsluice demo is running: a throwaway PostgreSQL on 127.0.0.1:{pg_port}, pgsluice in front of it.");
    println!("Connect with:");
    println!();
    println!("    psql \"postgres://postgres@{addr}/postgres\"");
    println!();
    if let Some(a) = handle.admin_addr() {
        println!("Metrics: http://{a}/metrics   Pools: http://{a}/pools");
    }
    println!("Press Ctrl-C to stop; everything is removed.");
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    println!("stopping...");
    handle.shutdown().await;
    drop(cluster);
    Ok(())
}

/// Reads a password from stdin and prints its SCRAM-SHA-256 verifier.
pub fn hash_password() -> Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    println!("{}", crate::auth::scram_verifier_for(pw));
    Ok(())
}
