//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Each `TempPostgres` owns a data directory in a temp dir and a postmaster bound to a free
//! loopback port. The cluster is killed and its directory removed on drop.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How `host` lines in pg_hba.conf authenticate TCP clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAuth {
    Trust,
    Md5,
    ScramSha256,
}

impl HostAuth {
    fn hba_method(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::Md5 => "md5",
            HostAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// Options for a cluster; `TempPostgres::new()` uses the defaults.
#[derive(Clone, Debug)]
pub struct Builder {
    settings: Vec<(String, String)>,
    auth: HostAuth,
    password: Option<String>,
    files: Vec<(String, Vec<u8>)>,
    hostssl_only: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            settings: Vec::new(),
            auth: HostAuth::Trust,
            password: None,
            files: Vec::new(),
            hostssl_only: false,
        }
    }
}

impl Builder {
    /// An extra server setting, as with `postgres -c name=value`.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Authentication for TCP clients, with the password given to the `postgres` role.
    pub fn host_auth(mut self, auth: HostAuth, password: &str) -> Self {
        self.auth = auth;
        self.password = Some(password.to_string());
        self
    }

    /// A file written into the data directory, readable by the server only (as the server
    /// requires of a TLS key), e.g. `ssl_cert_file` and `ssl_key_file` for `ssl=on`.
    pub fn data_file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_string(), contents.into()));
        self
    }

    /// TCP clients must use TLS (`hostssl` lines in pg_hba.conf instead of `host`).
    pub fn hostssl_only(mut self) -> Self {
        self.hostssl_only = true;
        self
    }

    pub fn spawn(self) -> TempPostgres {
        TempPostgres::launch(self)
    }
}

/// Where the PostgreSQL server programs live.
pub fn bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // pg_config's answer is the real install dir; PATH entries may be wrapper symlinks.
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                    return dir;
                }
            }
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).collect();
        // Debian keeps server programs off PATH, one directory per major version; newest first.
        let mut versioned: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.filter_map(|e| Some(e.ok()?.path().join("bin")))
                    .collect()
            })
            .unwrap_or_default();
        versioned.sort_by_key(|p| {
            let v = p
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str());
            std::cmp::Reverse(v.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0))
        });
        candidates.extend(versioned);
        for dir in candidates {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                return dir;
            }
        }
        panic!(
            "PostgreSQL server programs (initdb, pg_ctl) not found via pg_config, PATH \
             or /usr/lib/postgresql/*/bin"
        );
    })
}

/// A client program (psql, pgbench): the server's bindir first, then PATH.
pub fn client_program(name: &str) -> PathBuf {
    let candidate = bindir().join(name);
    if candidate.exists() {
        candidate
    } else {
        PathBuf::from(name)
    }
}

/// The account server programs run as: initdb and postgres refuse to run as root.
fn run_as_user() -> Option<&'static str> {
    static USER: OnceLock<Option<&'static str>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let exists = |u: &str| {
            Command::new("id")
                .arg("-u")
                .arg(u)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if exists("postgres") {
            Some("postgres")
        } else {
            Some("nobody")
        }
    })
}

fn server_command(program: &str) -> Command {
    let exe = bindir().join(program);
    match run_as_user() {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(user).arg("--").arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

fn chown_to_server_user(path: &Path) {
    if let Some(user) = run_as_user() {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(path)
            .status()
            .expect("run chown");
        assert!(st.success(), "chown {} to {user} failed", path.display());
    }
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pristine initdb'd data directory shared by all test processes, copied per cluster:
/// copying is several times faster than initdb when many tests start clusters at once.
fn template_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&bindir(), &mut hasher);
        std::hash::Hash::hash(&run_as_user(), &mut hasher);
        let key = std::hash::Hasher::finish(&hasher);
        let root = std::env::temp_dir().join(format!("pgsluice-pgtemplate-{key:016x}"));
        let ready = root.join("data").join("PG_VERSION");
        if ready.exists() {
            return root.join("data");
        }
        let staging = tempfile::Builder::new()
            .prefix("pgsluice-pgtemplate-staging")
            .tempdir()
            .expect("create staging dir");
        chown_to_server_user(staging.path());
        let data = staging.path().join("data");
        let out = server_command("initdb")
            .args(["--no-sync", "-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .arg("-D")
            .arg(&data)
            .output()
            .expect("run initdb");
        check(out, "initdb");
        // A concurrent process may win the rename; either way a complete template exists.
        let staged = staging.keep();
        if fs::rename(&staged, &root).is_err() {
            let _ = fs::remove_dir_all(&staged);
        }
        assert!(ready.exists(), "template data dir missing after initdb");
        root.join("data")
    })
}

/// Records which test process created a cluster directory.
const OWNER_FILE: &str = "owner.pid";

/// Stops clusters whose test process died without running Drop (e.g. killed on timeout),
/// so they do not pile up across runs. Done once per process.
fn sweep_orphans() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let is_ours = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pgsluice-pg") && !n.contains("template"));
            let Some(owner) = fs::read_to_string(dir.join(OWNER_FILE))
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            else {
                continue;
            };
            if !is_ours || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let pid_file = dir.join("data").join("postmaster.pid");
            if let Some(pm) = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
            {
                // Only signal a process that really is a postgres server for this dir.
                let cmdline = fs::read(format!("/proc/{pm}/cmdline")).unwrap_or_default();
                let data = dir.join("data");
                let needle = data.to_string_lossy();
                if String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
                    kill_cluster(pm);
                }
            }
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

/// Ends a postmaster and its children, even if they were left frozen with SIGSTOP.
fn kill_cluster(pm: i32) {
    let children = || -> Vec<i32> {
        fs::read_dir("/proc")
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| parent_pid(*pid) == Some(pm))
                    .collect()
            })
            .unwrap_or_default()
    };
    // SAFETY: kill(2) on a postmaster of a dead test process and on its children.
    unsafe {
        for pid in children() {
            libc::kill(pid, libc::SIGCONT);
        }
        libc::kill(pm, libc::SIGCONT);
        libc::kill(pm, libc::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Path::new(&format!("/proc/{pm}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe {
        for pid in children() {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::kill(pm, libc::SIGKILL);
    }
}

fn free_port() -> u16 {
    // Bind :0 so the kernel picks an unused port, then release it for the postmaster.
    // Another process may grab it in between; startup retries on a fresh port then.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

pub struct TempPostgres {
    dir: TempDir,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    password: Option<String>,
}

impl TempPostgres {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A running cluster with default options.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TempPostgres {
        Builder::default().spawn()
    }

    fn launch(opts: Builder) -> TempPostgres {
        sweep_orphans();
        let dir = tempfile::Builder::new()
            .prefix("pgsluice-pg")
            .tempdir()
            .expect("create temp dir");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("write owner file");
        let st = Command::new("cp")
            .arg("-a")
            .arg(template_dir())
            .arg(&data)
            .status()
            .expect("copy template");
        assert!(st.success(), "copying the template data dir failed");
        for (name, contents) in &opts.files {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            fs::write(&path, contents).expect("write data dir file");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .expect("chmod data dir file");
        }
        chown_to_server_user(dir.path());
        write_config(&data, dir.path(), &opts);

        let mut pg = TempPostgres {
            dir,
            data,
            log,
            port: 0,
            password: opts.password.clone(),
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => {
                    if let Some(pw) = &opts.password {
                        pg.set_password(pw);
                    }
                    return pg;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("postgres did not start after 5 attempts: {last_err}");
    }

    /// A streaming standby of `primary` (pg_basebackup -R), running on its own free port.
    pub fn standby_of(primary: &TempPostgres) -> TempPostgres {
        let dir = tempfile::Builder::new()
            .prefix("pgsluice-pg")
            .tempdir()
            .expect("create temp dir");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("write owner file");
        chown_to_server_user(dir.path());
        let out = server_command("pg_basebackup")
            .arg("-D")
            .arg(&data)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(primary.port.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run pg_basebackup");
        check(out, "pg_basebackup");
        // The primary's settings came along; the socket directory must be this one's.
        write_config(&data, dir.path(), &Builder::default());
        let mut pg = TempPostgres {
            dir,
            data,
            log,
            port: 0,
            password: None,
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => last_err = e,
            }
        }
        panic!("standby did not start after 5 attempts: {last_err}");
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        let out = server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "20", "promote"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl promote");
        check(out, "pg_ctl promote");
    }

    fn set_password(&self, pw: &str) {
        // Over the Unix socket, which pg_hba.conf always trusts.
        let sql = format!("ALTER ROLE postgres PASSWORD '{}'", pw.replace('\'', "''"));
        let out = Command::new(client_program("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        check(out, "setting the postgres password");
    }

    fn try_start(&self) -> Result<(), String> {
        let out = server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "20", "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start: {}\n{}\nlog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            ));
        }
        // pg_ctl -w already waited for readiness; confirm TCP accepts before handing it out.
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "port {} never accepted\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// The temp dir holding the data directory, log and Unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Superuser URL over TCP (carries the password when one was configured).
    pub fn url(&self) -> String {
        self.url_for("postgres", self.password.as_deref(), "postgres")
    }

    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        match password {
            Some(pw) => format!(
                "postgres://{user}:{}@127.0.0.1:{}/{db}",
                percent_encode(pw),
                self.port
            ),
            None => format!("postgres://{user}@127.0.0.1:{}/{db}", self.port),
        }
    }

    /// A superuser client; its connection task runs on the current tokio runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// Runs psql (no psqlrc, stop on error) against this cluster over TCP.
    pub fn psql(&self, args: &[&str]) -> Output {
        let mut c = Command::new(client_program("psql"));
        c.args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-d", "postgres"])
        .args(args)
        .stdin(Stdio::null());
        if let Some(pw) = &self.password {
            c.env("PGPASSWORD", pw);
        }
        c.output().expect("run psql")
    }

    fn pg_ctl_stop(&self, mode: &str) -> Output {
        server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "20", "-m", mode, "stop"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl stop")
    }

    /// Fast shutdown: sessions are terminated, the cluster shuts down cleanly.
    pub fn stop(&self) {
        check(self.pg_ctl_stop("fast"), "pg_ctl stop -m fast");
    }

    /// Crash-style stop (no checkpoint); the next start runs recovery.
    pub fn kill_immediate(&self) {
        check(self.pg_ctl_stop("immediate"), "pg_ctl stop -m immediate");
    }

    /// Starts again on the same port, retrying briefly while the port is still held.
    pub fn start(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Direct children of the postmaster (backends and auxiliary processes).
    pub fn backend_pids(&self) -> Vec<i32> {
        let Some(pm) = self.postmaster_pid() else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| parent_pid(*pid) == Some(pm))
            .collect()
    }

    fn signal_all(&self, sig: libc::c_int) {
        let mut pids = self.backend_pids();
        pids.extend(self.postmaster_pid());
        for pid in pids {
            // SAFETY: plain kill(2) on pids of processes this cluster started.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Freezes the postmaster and all its children (a hung database).
    pub fn sigstop_all(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    pub fn sigcont_all(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// Rows in pg_stat_activity with state 'active', excluding the asking session.
    pub async fn active_backends(client: &tokio_postgres::Client) -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("query pg_stat_activity")
            .get(0)
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // A frozen postmaster would never act on the stop request.
        self.sigcont_all();
        let pm = self.postmaster_pid();
        let out = server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "5", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(out, Ok(s) if s.success()) {
            if let Some(pid) = pm {
                // SAFETY: kill(2) on the postmaster this cluster started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Connects with tokio-postgres (NoTls) and drives the connection on a spawned task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    match try_connect(url).await {
        Ok(c) => c,
        Err(e) => panic!("connect {url}: {e}"),
    }
}

pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn write_config(data: &Path, sock_dir: &Path, opts: &Builder) {
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("open postgresql.conf");
    let mut settings: Vec<(String, String)> = vec![
        ("listen_addresses".into(), "'127.0.0.1'".into()),
        (
            "unix_socket_directories".into(),
            format!("'{}'", sock_dir.display()),
        ),
        ("fsync".into(), "off".into()),
        ("synchronous_commit".into(), "off".into()),
        ("full_page_writes".into(), "off".into()),
        ("max_connections".into(), "300".into()),
        ("shared_buffers".into(), "128MB".into()),
        ("logging_collector".into(), "off".into()),
        ("log_min_messages".into(), "warning".into()),
    ];
    if opts.auth == HostAuth::Md5 {
        // Store an md5 hash so the md5 method really runs md5 rather than upgrading to SCRAM.
        settings.push(("password_encryption".into(), "md5".into()));
    }
    for (k, v) in &opts.settings {
        settings.push((k.clone(), quote_setting(v)));
    }
    let mut text = String::from("\n# test harness\n");
    for (k, v) in settings {
        text.push_str(&format!("{k} = {v}\n"));
    }
    conf.write_all(text.as_bytes())
        .expect("write postgresql.conf");

    let method = opts.auth.hba_method();
    let host = if opts.hostssl_only { "hostssl" } else { "host" };
    let hba = format!(
        "local all all trust\n\
         {host} all all 127.0.0.1/32 {method}\n\
         {host} replication all 127.0.0.1/32 {method}\n"
    );
    // Truncating the existing file keeps its owner.
    fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
}

fn quote_setting(v: &str) -> String {
    if v.starts_with('\'') {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}
