//! Drivers run as separate programs (tests/clients/*): how to find each one, and running
//! its workload against the proxy with a bounded time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::report::{parse_checks, Cell};
use crate::common::pg::client_program;

/// Longest a workload may run; it is killed (with everything it started) after that.
const LIMIT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy)]
enum Kind {
    /// A script for the virtualenv's Python, and the module it needs.
    Python(&'static str, &'static str),
    Node,
    Java,
    Psql,
    Pgbench,
}

pub struct External {
    pub name: &'static str,
    kind: Kind,
}

pub fn all() -> Vec<External> {
    vec![
        External {
            name: "psycopg 3",
            kind: Kind::Python("psycopg_workload.py", "psycopg"),
        },
        External {
            name: "asyncpg",
            kind: Kind::Python("asyncpg_workload.py", "asyncpg"),
        },
        External {
            name: "node-postgres (pg)",
            kind: Kind::Node,
        },
        External {
            name: "pgjdbc",
            kind: Kind::Java,
        },
        External {
            name: "psql",
            kind: Kind::Psql,
        },
        External {
            name: "pgbench -M prepared",
            kind: Kind::Pgbench,
        },
    ]
}

/// Where the workload scripts live, and the build directory setup.sh installs into.
pub struct Layout {
    pub scripts: PathBuf,
    pub installed: PathBuf,
}

impl Layout {
    pub fn new() -> Layout {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        Layout {
            scripts: root.join("tests/clients"),
            installed: root.join("target/clients"),
        }
    }
}

const SETUP_HINT: &str = "run tests/clients/setup.sh";

/// Runs `program args` to see that it works; the error names what is missing.
fn probe(program: &Path, args: &[&str]) -> Result<(), String> {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{} {}` failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("{} not found ({e})", program.display())),
    }
}

fn require_file(path: &Path) -> Result<(), String> {
    if path.exists() {
        Ok(())
    } else {
        Err(format!("{} missing ({SETUP_HINT})", path.display()))
    }
}

impl External {
    /// The command that runs this workload, or why it cannot run here.
    fn command(&self, layout: &Layout) -> Result<Command, String> {
        let s = &layout.scripts;
        match self.kind {
            Kind::Python(script, module) => {
                let py = layout.installed.join("venv/bin/python");
                require_file(&py)?;
                probe(&py, &["-c", &format!("import {module}")])?;
                let mut c = Command::new(py);
                c.arg(s.join(script));
                Ok(c)
            }
            Kind::Node => {
                let node = PathBuf::from("node");
                probe(&node, &["--version"])?;
                require_file(&s.join("node/node_modules/pg/package.json"))?;
                require_file(&s.join("node/node_modules/pg-copy-streams/package.json"))?;
                let mut c = Command::new(node);
                c.arg(s.join("node/workload.js"));
                Ok(c)
            }
            Kind::Java => {
                let java = PathBuf::from("java");
                probe(&java, &["-version"])?;
                let jar = Path::new("/usr/share/java/postgresql.jar");
                require_file(jar)?;
                let classes = layout.installed.join("java");
                require_file(&classes.join("Workload.class"))?;
                let mut c = Command::new(java);
                c.arg("-cp")
                    .arg(format!("{}:{}", classes.display(), jar.display()))
                    .arg("Workload");
                Ok(c)
            }
            Kind::Psql => {
                let psql = client_program("psql");
                probe(&psql, &["--version"])?;
                // The cancel check presses Ctrl-C on a pseudo-terminal from script(1).
                probe(Path::new("script"), &["--version"])?;
                let mut c = Command::new("bash");
                c.arg(s.join("psql_workload.sh")).env("PSQL", psql);
                Ok(c)
            }
            Kind::Pgbench => {
                let pgbench = client_program("pgbench");
                probe(&pgbench, &["--version"])?;
                let mut c = Command::new("bash");
                c.arg(s.join("pgbench_workload.sh")).env("PGBENCH", pgbench);
                Ok(c)
            }
        }
    }

    /// Runs the workload against the proxy on `port` in pool mode `mode`.
    pub async fn run(&self, layout: &Layout, port: u16, mode: &str, table: &str) -> Cell {
        let mut cmd = match self.command(layout) {
            Ok(c) => c,
            Err(why) => return Cell::skip(why),
        };
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env("POOL_MODE", mode)
            .env("CLIENT_TABLE", table)
            .env("CLIENT_CONNS", "4")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(cmd);
        // Its own process group, so a timeout ends the helpers a script started too.
        cmd.process_group(0).kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Cell::skip(format!("could not start: {e}")),
        };
        let pid = child.id();
        match tokio::time::timeout(LIMIT, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                let ended = if out.status.success() {
                    Ok(())
                } else {
                    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    Err(format!("{}: {}", out.status, tail.join(" / ")))
                };
                if !out.status.success() {
                    eprintln!("--- {} ({mode}) stderr ---\n{stderr}", self.name);
                }
                Cell::judge(parse_checks(&stdout), ended)
            }
            Ok(Err(e)) => Cell::judge(Vec::new(), Err(format!("waiting for it: {e}"))),
            Err(_) => {
                if let Some(pid) = pid {
                    // SAFETY: signals the process group this test created for the workload.
                    unsafe {
                        libc::kill(-(pid as i32), libc::SIGKILL);
                    }
                }
                Cell::judge(
                    Vec::new(),
                    Err(format!("timed out after {} s", LIMIT.as_secs())),
                )
            }
        }
    }
}
