//! auth_query against a real PostgreSQL whose users have SCRAM verifiers only: no users
//! file, no user password anywhere in pgsluice's configuration (only the auth user's, in the
//! upstream URL). The client's SCRAM proof logs the proxy in upstream; wrong password and
//! unknown user look the same; a changed password takes effect after the cache TTL.

mod common;

use std::time::Duration;

use common::pg::HostAuth;
use common::{try_connect, TempPostgres, TestProxy};

const SUPER_PW: &str = "super secret";

fn proxy_url(proxy: &TestProxy, user: &str, pw: &str) -> String {
    format!(
        "postgres://{user}:{pw}@127.0.0.1:{}/postgres?connect_timeout=10",
        proxy.port()
    )
}

async fn current_user(url: &str) -> Result<String, tokio_postgres::Error> {
    let c = try_connect(url).await?;
    let row = c.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_only_users_are_looked_up_and_passed_through() {
    let pg = tokio::task::spawn_blocking(|| {
        TempPostgres::builder()
            .host_auth(HostAuth::ScramSha256, SUPER_PW)
            .spawn()
    })
    .await
    .unwrap();
    let admin = try_connect(&pg.url()).await.expect("superuser over SCRAM");
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN PASSWORD 'app pw'; CREATE TABLE t(v int); GRANT ALL ON t TO app",
        )
        .await
        .unwrap();
    let proxy = TestProxy::start(
        &pg,
        &[
            "--auth",
            "scram-sha-256",
            "--auth-user",
            "postgres",
            "--auth-cache-ttl",
            "1s",
            "--pool-size",
            "3",
        ],
    )
    .await;

    assert_eq!(
        current_user(&proxy_url(&proxy, "app", "app%20pw"))
            .await
            .unwrap(),
        "app"
    );

    // Several clients at once: the pool opens more server connections with the keys.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            try_connect(&proxy_url(&proxy, "app", "app%20pw"))
                .await
                .unwrap(),
        );
    }
    let txs = clients.iter().enumerate().map(|(i, c)| async move {
        c.batch_execute("BEGIN").await?;
        c.execute("INSERT INTO t VALUES ($1)", &[&(i as i32)])
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.batch_execute("COMMIT").await
    });
    for r in futures::future::join_all(txs).await {
        r.expect("transaction through a keyed server login");
    }
    let n: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    let backends: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        backends >= 2,
        "three overlapping transactions used {backends} connections"
    );
    drop(clients);

    // Wrong password and unknown user: the same code and the same message shape.
    let wrong = current_user(&proxy_url(&proxy, "app", "nope"))
        .await
        .unwrap_err();
    let ghost = current_user(&proxy_url(&proxy, "ghost", "nope"))
        .await
        .unwrap_err();
    assert_eq!(code(&wrong).as_deref(), Some("28P01"), "{wrong:?}");
    assert_eq!(code(&ghost).as_deref(), Some("28P01"), "{ghost:?}");
    let msg = |e: &tokio_postgres::Error| e.as_db_error().unwrap().message().to_string();
    assert_eq!(
        msg(&wrong).replace("app", "X"),
        msg(&ghost).replace("ghost", "X")
    );

    // A changed password: the cached verifier serves until the TTL, then the new one.
    admin
        .batch_execute("ALTER ROLE app PASSWORD 'new pw'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let old = current_user(&proxy_url(&proxy, "app", "app%20pw"))
        .await
        .unwrap_err();
    assert_eq!(code(&old).as_deref(), Some("28P01"), "{old:?}");
    assert_eq!(
        current_user(&proxy_url(&proxy, "app", "new%20pw"))
            .await
            .unwrap(),
        "app"
    );
    // New server connections log in with the new keys: end the pooled ones first.
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        current_user(&proxy_url(&proxy, "app", "new%20pw"))
            .await
            .unwrap(),
        "app"
    );

    // A role that cannot log in is refused by the upstream, not by a guess of the proxy.
    admin.batch_execute("ALTER ROLE app NOLOGIN").await.unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = current_user(&proxy_url(&proxy, "app", "new%20pw"))
        .await
        .unwrap_err();
    assert!(code(&e).is_some(), "refused with a SQLSTATE: {e:?}");
    proxy.shutdown().await;
}
