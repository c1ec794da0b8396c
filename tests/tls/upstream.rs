//! Upstream TLS: sslmode require / verify-ca / verify-full against a cluster with `ssl=on`,
//! a clear error when the certificate does not verify, and SCRAM-SHA-256-PLUS.

use super::common::{connect, try_connect, HostAuth, TestProxy};
use super::pki::{write, Ca};
use super::{db_message, refused, ssl_cluster};
use pgsluice::auth::{upstream_startup_bound, Binding, UpstreamAuth, UpstreamAuthError};
use pgsluice::config::Upstream;
use pgsluice::tls::upstream::UpstreamTls;

async fn server_uses_ssl(proxy: &TestProxy) -> bool {
    let c = connect(&proxy.url()).await;
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_tls_in_each_sslmode() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("db CA");
    let ca_path = write(dir.path(), "ca.pem", &ca.pem()).display().to_string();
    // Only "localhost": connecting to 127.0.0.1 passes verify-ca but not verify-full.
    let pg = ssl_cluster(ca.server(&["localhost"]), None).await;
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());

    // The cluster refuses plaintext, so a working session proves TLS upstream.
    let proxy = TestProxy::start_upstream(&format!("{base}?sslmode=disable"), &[]).await;
    let err = refused(
        try_connect(&proxy.url()).await,
        "plaintext upstream accepted",
    );
    assert!(db_message(&err).contains("no pg_hba.conf entry"), "{err:?}");
    proxy.shutdown().await;

    for mode in [
        "prefer",
        "require",
        &format!("verify-ca&sslrootcert={ca_path}"),
    ] {
        let proxy = TestProxy::start_upstream(&format!("{base}?sslmode={mode}"), &[]).await;
        assert!(server_uses_ssl(&proxy).await, "sslmode={mode}");
        // The health check logs in over TLS too: the proxy becomes ready.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, body) = proxy.http_get("/readyz").await;
            if status == 200 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sslmode={mode}: /readyz {status} {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        proxy.shutdown().await;
    }
    let full = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca_path}",
        pg.port()
    );
    let proxy = TestProxy::start_upstream(&full, &[]).await;
    assert!(
        server_uses_ssl(&proxy).await,
        "verify-full with the right name"
    );
    proxy.shutdown().await;

    // verify-full to 127.0.0.1, which the certificate does not name.
    let proxy = TestProxy::start_upstream(
        &format!("{base}?sslmode=verify-full&sslrootcert={ca_path}"),
        &[],
    )
    .await;
    let err = refused(try_connect(&proxy.url()).await, "wrong name accepted");
    let db = err.as_db_error().expect("an error from the proxy");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::CONNECTION_FAILURE
    );
    assert!(
        db.message()
            .contains("certificate not valid for name \"127.0.0.1\""),
        "{}",
        db.message()
    );
    proxy.shutdown().await;

    // verify-full against another CA.
    let stranger = Ca::new("stranger CA");
    let stranger_path = write(dir.path(), "stranger.pem", &stranger.pem());
    let proxy = TestProxy::start_upstream(
        &format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            stranger_path.display()
        ),
        &[],
    )
    .await;
    let err = refused(try_connect(&proxy.url()).await, "foreign CA accepted");
    let db = err.as_db_error().expect("an error from the proxy");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::CONNECTION_FAILURE
    );
    let m = db.message();
    assert!(
        m.contains("TLS") && m.contains("invalid peer certificate") && m.contains("UnknownIssuer"),
        "{m}"
    );
    proxy.shutdown().await;
}

/// Logs in directly with the proxy's upstream code; returns the method used.
async fn login(url: &str, password: &str, tamper: bool) -> Result<UpstreamAuth, UpstreamAuthError> {
    let up = Upstream::parse(url).expect("url");
    let tls = UpstreamTls::new(&up).expect("tls config");
    let tcp = tokio::net::TcpStream::connect(up.first().connect_addr())
        .await
        .expect("connect");
    let secured = tls.secure(tcp, &up.first().host).await.expect("TLS");
    let mut end_point = secured.end_point;
    if tamper {
        // Another certificate's hash: a server that checks the binding must refuse.
        if let Some(ep) = end_point.as_mut() {
            ep[0] ^= 1;
        }
    }
    let binding = Binding {
        tls: secured.stream.is_tls(),
        end_point,
        mode: up.channel_binding,
    };
    let mut s = secured.stream;
    let params = [("user", "postgres"), ("database", "postgres")];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        upstream_startup_bound(&mut s, &params, Some(password), &binding),
    )
    .await
    .expect("login must not hang")
    .map(|st| st.auth)
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_sha_256_plus_is_used_upstream_over_tls() {
    let pw = "plus-secret";
    // P-384 CA: the certificate is signed with SHA-384, so the binding hash must be too.
    let ca = Ca::new_p384("db CA");
    let leaf = ca.server(&["127.0.0.1"]);
    let ep = pgsluice::tls::binding::tls_server_end_point(&leaf.cert_der).unwrap();
    assert_eq!(ep.len(), 48, "SHA-384 for an ecdsa-with-SHA384 certificate");
    let p256 = Ca::new("other").server(&["127.0.0.1"]).cert_der;
    assert_eq!(
        pgsluice::tls::binding::tls_server_end_point(&p256)
            .unwrap()
            .len(),
        32
    );
    let pg = ssl_cluster(leaf, Some((HostAuth::ScramSha256, pw))).await;
    let base = format!("postgres://postgres:{pw}@127.0.0.1:{}/postgres", pg.port());

    let url = format!("{base}?sslmode=require");
    assert_eq!(
        login(&url, pw, false).await.unwrap(),
        UpstreamAuth::ScramSha256Plus
    );
    let disabled = format!("{base}?sslmode=require&channel_binding=disable");
    assert_eq!(
        login(&disabled, pw, false).await.unwrap(),
        UpstreamAuth::ScramSha256
    );
    // The server really checks the binding data.
    let e = login(&url, pw, true)
        .await
        .expect_err("tampered binding accepted");
    assert!(matches!(e, UpstreamAuthError::Server { .. }), "{e}");

    // Through the proxy, with channel binding required.
    let proxy = TestProxy::start_upstream(
        &format!("{base}?sslmode=require&channel_binding=require"),
        &[],
    )
    .await;
    let c = connect(&proxy.url()).await;
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn channel_binding_require_refuses_a_server_without_it() {
    let ca = Ca::new("db CA");
    // Trust over TLS: no SASL at all, so no binding can have happened.
    let pg = ssl_cluster(ca.server(&["127.0.0.1"]), None).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require&channel_binding=require",
        pg.port()
    );
    let e = login(&url, "unused", false)
        .await
        .expect_err("login without binding");
    assert!(
        matches!(e, UpstreamAuthError::ChannelBindingRequired(_)),
        "{e}"
    );
    let proxy = TestProxy::start_upstream(&url, &[]).await;
    let err = refused(try_connect(&proxy.url()).await, "accepted without binding");
    assert!(
        db_message(&err).contains("channel_binding=require"),
        "{err:?}"
    );
    proxy.shutdown().await;
}
