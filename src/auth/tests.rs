//! Whole client-facing exchanges over an in-memory pipe, with postgres-protocol's client code
//! playing the client.

use super::*;
use crate::protocol::read_message;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{duplex, DuplexStream};
use tokio::task::JoinHandle;

fn store() -> UserStore {
    let scram = ScramVerifier::from_password("scrampw", b"fixed-salt-16byt", 4096);
    UserStore::parse(&format!(
        "alice:right\nbob:{}\ncarol:{scram}\n",
        md5::md5_stored("bobpw", "bob")
    ))
    .unwrap()
}

/// Starts the server side; returns the client end and the server's result.
fn serve(
    method: AuthMethod,
    user: &str,
    users: UserStore,
) -> (DuplexStream, JoinHandle<Result<(), AuthError>>) {
    let (client, mut server) = duplex(64 * 1024);
    let user = user.to_owned();
    let task = tokio::spawn(async move {
        authenticate_client(&mut server, method, &user, &users)
            .await
            .map(|_| ())
    });
    (client, task)
}

async fn send(c: &mut DuplexStream, buf: &BytesMut) {
    c.write_all(buf).await.unwrap();
}

/// Reads one 'R' message: (code, payload), or None when the server hung up.
async fn read_auth(c: &mut DuplexStream) -> Option<(i32, Vec<u8>)> {
    let (tag, body) = read_message(c, 1 << 16).await.ok()?;
    assert_eq!(tag, b'R');
    let code = i32::from_be_bytes(body[..4].try_into().unwrap());
    Some((code, body[4..].to_vec()))
}

/// What the client saw: the sequence of request codes, and whether it verified the server.
#[derive(Debug, PartialEq)]
struct Seen {
    codes: Vec<i32>,
    server_verified: bool,
    salt: Vec<u8>,
}

async fn scram_client(
    c: &mut DuplexStream,
    password: &str,
    cb: ChannelBinding,
    tamper: impl Fn(String) -> String,
) -> Seen {
    let mut seen = Seen {
        codes: vec![],
        server_verified: false,
        salt: vec![],
    };
    let (code, mechs) = read_auth(c).await.unwrap();
    seen.codes.push(code);
    assert_eq!(mechs, b"SCRAM-SHA-256\0\0");
    let mut scram = ScramSha256::new(password.as_bytes(), cb);
    let mut buf = BytesMut::new();
    frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut buf).unwrap();
    send(c, &buf).await;
    let Some((code, server_first)) = read_auth(c).await else {
        return seen;
    };
    seen.codes.push(code);
    let sf = String::from_utf8(server_first.clone()).unwrap();
    let salt_b64 = sf.split(',').find_map(|a| a.strip_prefix("s=")).unwrap();
    seen.salt =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, salt_b64).unwrap();
    scram.update(&server_first).unwrap();
    let client_final = tamper(String::from_utf8(scram.message().to_vec()).unwrap());
    buf.clear();
    frontend::sasl_response(client_final.as_bytes(), &mut buf).unwrap();
    send(c, &buf).await;
    if let Some((code, server_final)) = read_auth(c).await {
        seen.codes.push(code);
        seen.server_verified = scram.finish(&server_final).is_ok();
    }
    seen
}

fn same(s: String) -> String {
    s
}

#[tokio::test]
async fn auth_scram_exchange_right_password() {
    for (user, pw) in [("alice", "right"), ("carol", "scrampw")] {
        let (mut c, task) = serve(AuthMethod::ScramSha256, user, store());
        let seen = scram_client(&mut c, pw, ChannelBinding::unsupported(), same).await;
        task.await.unwrap().unwrap();
        assert_eq!(seen.codes, vec![10, 11, 12]);
        assert!(
            seen.server_verified,
            "client must verify the server signature"
        );
    }
    // "y,," (client could bind, server did not offer) is accepted too.
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    let seen = scram_client(&mut c, "right", ChannelBinding::unrequested(), same).await;
    task.await.unwrap().unwrap();
    assert!(seen.server_verified);
}

#[tokio::test]
async fn auth_scram_exchange_wrong_password_fails_28p01() {
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    let seen = scram_client(&mut c, "wrong", ChannelBinding::unsupported(), same).await;
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.sqlstate(), "28P01");
    assert_eq!(
        err.client_message(),
        "password authentication failed for user \"alice\""
    );
    assert_eq!(
        seen.codes,
        vec![10, 11],
        "no SASLFinal after a failed proof"
    );
}

#[tokio::test]
async fn auth_scram_exchange_tampered_proof_fails() {
    let flip = |s: String| {
        let (head, proof) = s.rsplit_once(",p=").unwrap();
        let mut p =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, proof).unwrap();
        p[0] ^= 1;
        let p = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, p);
        format!("{head},p={p}")
    };
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    scram_client(&mut c, "right", ChannelBinding::unsupported(), flip).await;
    assert_eq!(task.await.unwrap().unwrap_err().sqlstate(), "28P01");
}

#[tokio::test]
async fn auth_scram_exchange_wrong_nonce_fails() {
    let renonce = |s: String| s.replacen(",r=", ",r=X", 1);
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    scram_client(&mut c, "right", ChannelBinding::unsupported(), renonce).await;
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.sqlstate(), "08P01");
    assert!(err.client_message().contains("nonce"), "{err}");
}

#[tokio::test]
async fn auth_scram_exchange_channel_binding_mismatch_fails() {
    // Client-final claims "y,," while client-first said "n,,".
    let rebind = |s: String| s.replacen("c=biws", "c=eSws", 1);
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    scram_client(&mut c, "right", ChannelBinding::unsupported(), rebind).await;
    assert_eq!(task.await.unwrap().unwrap_err().sqlstate(), "08P01");
}

#[tokio::test]
async fn auth_scram_rejects_channel_binding_request_and_wrong_mechanism() {
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    read_auth(&mut c).await.unwrap();
    let mut buf = BytesMut::new();
    frontend::sasl_initial_response(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc", &mut buf)
        .unwrap();
    send(&mut c, &buf).await;
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.sqlstate(), "08P01");
    assert!(err.client_message().contains("TLS"), "{err}");

    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    read_auth(&mut c).await.unwrap();
    buf.clear();
    frontend::sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc", &mut buf).unwrap();
    send(&mut c, &buf).await;
    assert_eq!(task.await.unwrap().unwrap_err().sqlstate(), "08P01");
}

#[tokio::test]
async fn auth_scram_unknown_user_same_flow_28p01() {
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    let known = scram_client(&mut c, "wrong", ChannelBinding::unsupported(), same).await;
    let known_err = task.await.unwrap().unwrap_err();
    let mut salts = vec![];
    for _ in 0..2 {
        let (mut c, task) = serve(AuthMethod::ScramSha256, "mallory", store());
        let seen = scram_client(&mut c, "right", ChannelBinding::unsupported(), same).await;
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(seen.codes, known.codes);
        assert_eq!(seen.salt.len(), known.salt.len());
        assert_eq!(err.sqlstate(), known_err.sqlstate());
        assert_eq!(
            err.client_message(),
            "password authentication failed for user \"mallory\""
        );
        salts.push(seen.salt);
    }
    // A stable salt per name, as for a real user: a changing one would give the game away.
    assert_eq!(salts[0], salts[1]);
}

/// Runs an MD5 login, answering with `respond(salt)`. Returns the request codes seen.
async fn md5_login(
    user: &str,
    users: UserStore,
    respond: impl Fn([u8; 4]) -> String,
) -> (Vec<i32>, [u8; 4], Result<(), AuthError>) {
    let (mut c, task) = serve(AuthMethod::Md5, user, users);
    let (code, salt) = read_auth(&mut c).await.unwrap();
    let salt: [u8; 4] = salt.try_into().unwrap();
    let mut buf = BytesMut::new();
    frontend::password_message(respond(salt).as_bytes(), &mut buf).unwrap();
    send(&mut c, &buf).await;
    let res = task.await.unwrap();
    (vec![code], salt, res)
}

#[tokio::test]
async fn auth_md5_right_wrong_and_replayed() {
    for (user, pw) in [("alice", "right"), ("bob", "bobpw")] {
        let (codes, _, res) = md5_login(user, store(), |salt| {
            md5_hash(user.as_bytes(), pw.as_bytes(), salt)
        })
        .await;
        assert_eq!(codes, vec![5]);
        res.unwrap();
        let (_, _, res) = md5_login(user, store(), |salt| {
            md5_hash(user.as_bytes(), b"nope", salt)
        })
        .await;
        assert_eq!(res.unwrap_err().sqlstate(), "28P01");
    }
    // Capture a good response, then replay it against the next login's fresh salt.
    let captured = std::sync::Mutex::new(String::new());
    let (_, salt1, res) = md5_login("alice", store(), |salt| {
        let r = md5_hash(b"alice", b"right", salt);
        *captured.lock().unwrap() = r.clone();
        r
    })
    .await;
    res.unwrap();
    let replay = captured.lock().unwrap().clone();
    let (_, salt2, res) = md5_login("alice", store(), |_| replay.clone()).await;
    assert_ne!(salt1, salt2, "each login must use a fresh salt");
    assert_eq!(res.unwrap_err().sqlstate(), "28P01");
}

#[tokio::test]
async fn auth_md5_unknown_user_same_flow_28p01() {
    let (codes, _, res) = md5_login("mallory", store(), |salt| {
        md5_hash(b"mallory", b"right", salt)
    })
    .await;
    assert_eq!(codes, vec![5]);
    let err = res.unwrap_err();
    assert_eq!(err.sqlstate(), "28P01");
    assert_eq!(
        err.client_message(),
        "password authentication failed for user \"mallory\""
    );
}

#[tokio::test]
async fn auth_method_and_secret_mismatches() {
    // SCRAM requested, only an MD5 hash stored: cannot be served.
    let (_c, task) = serve(AuthMethod::ScramSha256, "bob", store());
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.sqlstate(), "28000");
    assert!(err.client_message().contains("\"bob\""), "{err}");
    // MD5 requested, only a SCRAM verifier stored: SCRAM runs instead, as in PostgreSQL.
    let (mut c, task) = serve(AuthMethod::Md5, "carol", store());
    let seen = scram_client(&mut c, "scrampw", ChannelBinding::unsupported(), same).await;
    task.await.unwrap().unwrap();
    assert!(seen.server_verified);
}

#[tokio::test]
async fn auth_trust_and_protocol_errors() {
    let (_c, task) = serve(AuthMethod::Trust, "anyone", UserStore::empty());
    task.await.unwrap().unwrap();

    // A Query instead of a password message.
    let (mut c, task) = serve(AuthMethod::Md5, "alice", store());
    read_auth(&mut c).await.unwrap();
    let mut buf = BytesMut::new();
    protocol::query(&mut buf, "select 1");
    send(&mut c, &buf).await;
    assert_eq!(task.await.unwrap().unwrap_err().sqlstate(), "08P01");

    // Oversized message.
    let (mut c, task) = serve(AuthMethod::Md5, "alice", store());
    read_auth(&mut c).await.unwrap();
    c.write_all(&[b'p', 0x7f, 0, 0, 0]).await.unwrap();
    assert_eq!(task.await.unwrap().unwrap_err().sqlstate(), "08P01");

    // Client hangs up (as psql does to prompt for a password).
    let (mut c, task) = serve(AuthMethod::ScramSha256, "alice", store());
    read_auth(&mut c).await.unwrap();
    drop(c);
    assert!(task.await.unwrap().unwrap_err().is_disconnect());
}

#[test]
fn auth_method_names() {
    use clap::ValueEnum;
    let names: Vec<String> = AuthMethod::value_variants()
        .iter()
        .map(|m| m.to_possible_value().unwrap().get_name().to_owned())
        .collect();
    assert_eq!(names, ["trust", "md5", "scram-sha-256"]);
    for m in AuthMethod::value_variants() {
        let json = serde_json::to_string(m).unwrap();
        assert_eq!(json, format!("\"{}\"", m.as_str()));
        assert_eq!(serde_json::from_str::<AuthMethod>(&json).unwrap(), *m);
    }
}
