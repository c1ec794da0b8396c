//! Upstream login against a real PostgreSQL with each server-side method: trust, password
//! (cleartext), md5 and scram-sha-256, plus the failure cases.

use pgsluice::auth::{upstream_startup, UpstreamAuth, UpstreamAuthError, UpstreamStartup};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::net::TcpStream;

const SUPERUSER_PW: &str = "super-secret";

/// Throwaway cluster: initdb + pg_ctl as the `postgres` OS user, stopped on drop.
struct TempPg {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
}

fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    // Fall back to PATH lookup by the shell.
    PathBuf::new()
}

fn run_as_postgres(bin: &Path, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("runuser must be available");
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chown_postgres(path: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

impl TempPg {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bindir = bindir();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PW).unwrap();
        chown_postgres(dir.path());
        let data = dir.path().join("data");
        run_as_postgres(
            &bindir.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--no-sync",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = TempPg { dir, bindir, port };
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("log");
        run_as_postgres(
            &pg.bindir.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
                "start",
            ],
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Rewrites pg_hba.conf: the unix socket trusts everyone (for setup), TCP uses `method`.
    fn set_tcp_method(&self, method: &str) {
        let hba = format!("local all all trust\nhost all all 127.0.0.1/32 {method}\n");
        std::fs::write(self.data().join("pg_hba.conf"), hba).unwrap();
        run_as_postgres(
            &self.bindir.join("pg_ctl"),
            &["-D", self.data().to_str().unwrap(), "reload"],
        );
    }

    async fn admin(&self, sql: &str) {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(self.dir.path())
            .port(self.port)
            .user("postgres")
            .password(SUPERUSER_PW)
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = task.await;
    }

    async fn login(
        &self,
        user: &str,
        db: &str,
        password: Option<&str>,
    ) -> Result<UpstreamStartup, UpstreamAuthError> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let params = [("user", user), ("database", db), ("application_name", "t")];
        tokio::time::timeout(
            Duration::from_secs(10),
            upstream_startup(&mut s, &params, password),
        )
        .await
        .expect("upstream_startup must not hang")
    }

    /// Logs in until the reloaded pg_hba.conf is in effect (reload is asynchronous).
    async fn login_expect(&self, user: &str, pw: &str, want: UpstreamAuth) -> UpstreamStartup {
        let mut last = None;
        for _ in 0..100 {
            match self.login(user, "postgres", Some(pw)).await {
                Ok(st) if st.auth == want => return st,
                other => last = Some(other),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("login as {user} never used {want:?}: last {last:?}");
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bindir.join("pg_ctl"))
            .args(["-D", self.data().to_str().unwrap_or(""), "-m", "immediate"])
            .args(["-w", "stop"])
            .output();
    }
}

fn assert_server_code(res: Result<UpstreamStartup, UpstreamAuthError>, code: &str) {
    match res {
        Err(UpstreamAuthError::Server {
            code: c, severity, ..
        }) => {
            assert_eq!(c, code);
            assert_eq!(severity, "FATAL");
        }
        other => panic!("expected server error {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auth_against_real_postgres() {
    let pg = TempPg::start();
    pg.admin(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE u_scram LOGIN PASSWORD 'pw scram';
         SET password_encryption = 'md5';
         CREATE ROLE u_md5 LOGIN PASSWORD 'pw-md5';",
    )
    .await;

    // initdb -A scram-sha-256 already applies to TCP.
    let st = pg
        .login_expect("postgres", SUPERUSER_PW, UpstreamAuth::ScramSha256)
        .await;
    assert!(st.pid > 0, "BackendKeyData must be read");
    let param = |k: &str| {
        st.params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert!(param("server_version").is_some(), "{:?}", st.params);
    assert_eq!(param("application_name").as_deref(), Some("t"));
    pg.login_expect("u_scram", "pw scram", UpstreamAuth::ScramSha256)
        .await;
    assert_server_code(
        pg.login("u_scram", "postgres", Some("wrong")).await,
        "28P01",
    );
    assert!(matches!(
        pg.login("u_scram", "postgres", None).await,
        Err(UpstreamAuthError::PasswordRequired)
    ));
    assert_server_code(
        pg.login("u_scram", "no_such_db", Some("pw scram")).await,
        "3D000",
    );

    pg.set_tcp_method("md5");
    pg.login_expect("u_md5", "pw-md5", UpstreamAuth::Md5).await;
    assert_server_code(pg.login("u_md5", "postgres", Some("wrong")).await, "28P01");
    // md5 in pg_hba with a SCRAM-stored password: the server picks SCRAM.
    pg.login_expect("u_scram", "pw scram", UpstreamAuth::ScramSha256)
        .await;

    pg.set_tcp_method("password");
    pg.login_expect("u_md5", "pw-md5", UpstreamAuth::Cleartext)
        .await;
    pg.login_expect("u_scram", "pw scram", UpstreamAuth::Cleartext)
        .await;
    assert_server_code(
        pg.login("u_scram", "postgres", Some("wrong")).await,
        "28P01",
    );

    pg.set_tcp_method("trust");
    pg.login_expect("u_md5", "ignored", UpstreamAuth::None)
        .await;
    let st = pg.login("u_md5", "postgres", None).await.unwrap();
    assert_eq!(st.auth, UpstreamAuth::None);

    pg.set_tcp_method("reject");
    let mut last = None;
    for _ in 0..100 {
        let r = pg.login("u_md5", "postgres", None).await;
        if matches!(&r, Err(UpstreamAuthError::Server { .. })) {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_server_code(last.expect("reject never took effect"), "28000");
}
