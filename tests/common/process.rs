//! The built proxy binary as a child process: its own descriptor limit and address space, so
//! a test can hold more connections than one process could, and read the proxy's RSS and
//! descriptors without the test harness mixed in.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::http_request;

/// Lines of the proxy's stderr kept for failure messages.
const LOG_TAIL: usize = 200;

pub struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// The proxy's log filter (`PGSLUICE_LOG`) and how many of its newest lines are kept.
pub struct LogOpts<'a> {
    pub filter: &'a str,
    pub keep: usize,
}

impl Default for LogOpts<'_> {
    fn default() -> Self {
        LogOpts {
            filter: "warn",
            keep: LOG_TAIL,
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

impl ProxyProcess {
    /// Starts `pgsluice` on free loopback ports with `extra_flags` and waits until `/readyz`
    /// answers 200 (the upstream passed a health check).
    pub async fn start(upstream: &str, extra_flags: &[&str]) -> ProxyProcess {
        // For diagnosis: `PGSLUICE_LOG=debug PGSLUICE_TEST_PROXY_LOG=/tmp/proxy.log`.
        let filter = std::env::var("PGSLUICE_LOG").unwrap_or_else(|_| "warn".into());
        let opts = LogOpts {
            filter: &filter,
            ..LogOpts::default()
        };
        Self::start_logged(upstream, extra_flags, opts).await
    }

    /// Same, with the proxy's log filter and the number of log lines kept chosen.
    pub async fn start_logged(
        upstream: &str,
        extra_flags: &[&str],
        log_opts: LogOpts<'_>,
    ) -> ProxyProcess {
        let keep = log_opts.keep.max(1);
        let mut last = String::new();
        // A port picked free can be taken before the child binds it; retry on fresh ports.
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgsluice"));
            // For diagnosis only, e.g. a heap profiler's LD_PRELOAD for the proxy alone:
            // `PGSLUICE_TEST_PROXY_ENV="K=V;K2=V2"`.
            if let Ok(extra) = std::env::var("PGSLUICE_TEST_PROXY_ENV") {
                for kv in extra.split(';').filter(|kv| !kv.is_empty()) {
                    if let Some((k, v)) = kv.split_once('=') {
                        cmd.env(k, v);
                    }
                }
            }
            let mut child = cmd
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--upstream", upstream])
                .args(extra_flags)
                .env("PGSLUICE_LOG", log_opts.filter)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start pgsluice");
            let log = Arc::new(Mutex::new(VecDeque::new()));
            let stderr = child.stderr.take().expect("stderr");
            let sink = log.clone();
            // Drained continuously so a chatty proxy never blocks on a full pipe.
            let mut copy = std::env::var("PGSLUICE_TEST_PROXY_LOG")
                .ok()
                .and_then(|path| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .ok()
                });
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(f) = copy.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                    let mut l = sink.lock().unwrap();
                    if l.len() >= keep {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
            let mut p = ProxyProcess {
                child,
                addr,
                admin,
                log,
            };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(st)) = p.child.try_wait() {
                    last = format!("exited {st}: {}", p.log_tail());
                    break;
                }
                if tokio::net::TcpStream::connect(admin).await.is_ok()
                    && http_request(admin, "GET", "/readyz").await.0 == 200
                {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if last.is_empty() {
                last = format!("not ready in 15 s: {}", p.log_tail());
            }
        }
        panic!("pgsluice did not start: {last}");
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@{}/postgres?connect_timeout=10",
            self.addr
        )
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub fn open_fds(&self) -> usize {
        open_fds(self.pid())
    }

    /// Kept log lines that contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        let l = self.log.lock().unwrap();
        l.iter().filter(|x| x.contains(needle)).cloned().collect()
    }

    pub fn log_tail(&self) -> String {
        let l = self.log.lock().unwrap();
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// `GET /pools` parsed.
    pub async fn pools(&self) -> serde_json::Value {
        let (status, body) = http_request(self.admin, "GET", "/pools").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/pools is JSON")
    }

    /// The sum of every sample of a metric family whose labels contain `labels`.
    pub async fn metric_sum(&self, name: &str, labels: &str) -> f64 {
        let (status, body) = http_request(self.admin, "GET", "/metrics").await;
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let rest = series.strip_prefix(name)?;
                if !(rest.is_empty() || rest.starts_with('{')) || !rest.contains(labels) {
                    return None;
                }
                value.parse::<f64>().ok()
            })
            .sum()
    }

    /// SIGTERM, then SIGKILL after `limit`; true when it exited 0 in time.
    pub fn terminate(mut self, limit: Duration) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Resident set size of a process from `/proc/<pid>/status`, in KiB (0 if unreadable).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process (0 if unreadable).
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
