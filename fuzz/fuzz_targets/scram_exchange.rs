//! Drives the client-facing authentication exchange (SCRAM-SHA-256 and MD5) with fuzzed
//! client messages over an in-memory stream. The server side must finish with Ok or an
//! error, never panic or hang, and must never accept a login without the right proof.
//!
//! Input layout: byte 0 picks method, user and mode; the rest is split at the first "|~|"
//! into client-first and client-final. In the scripted mode the client-final may use "%N"
//! (replaced by the nonce the server sent) and "%P" (replaced by the correct proof for
//! password "pw"), so the deep paths after the nonce check are reachable. In raw mode the
//! whole rest is written as the client's byte stream.
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use pgsluice::auth::{authenticate_client, AuthMethod, ScramVerifier, UserStore};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const PASSWORD: &str = "pw";
const SALT: &[u8] = b"fuzz-salt-16byte";

fn store() -> &'static UserStore {
    static STORE: OnceLock<UserStore> = OnceLock::new();
    STORE.get_or_init(|| {
        // One PBKDF2 iteration keeps each execution cheap; the exchange is the same.
        let v = ScramVerifier::from_password(PASSWORD, SALT, 1);
        let bob = pgsluice::auth::md5::md5_stored(PASSWORD, "bob");
        UserStore::parse(&format!("alice:{v}\nbob:{bob}\n")).unwrap()
    })
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn proof(auth_message: &str) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(PASSWORD.as_bytes(), SALT, 1, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored: [u8; 32] = Sha256::digest(client_key).into();
    let sig = hmac(&stored, auth_message.as_bytes());
    let p: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
    B64.encode(p)
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Reads one backend message; None on EOF or a malformed frame.
async fn read_msg(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    s.read_exact(&mut hdr).await.ok()?;
    let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    let mut body = vec![0u8; usize::try_from(len).ok()?.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    Some((hdr[0], body))
}

/// Plays the client: returns true if the server sent AuthenticationSASLFinal.
async fn scripted_client(mut c: DuplexStream, first: Vec<u8>, fin: Vec<u8>) -> bool {
    let Some((b'R', _)) = read_msg(&mut c).await else {
        return false;
    };
    let mut init = b"SCRAM-SHA-256\0".to_vec();
    init.extend_from_slice(&(first.len() as i32).to_be_bytes());
    init.extend_from_slice(&first);
    if c.write_all(&frame(b'p', &init)).await.is_err() {
        return false;
    }
    let Some((b'R', cont)) = read_msg(&mut c).await else {
        return false;
    };
    let server_first = String::from_utf8_lossy(cont.get(4..).unwrap_or_default()).into_owned();
    let nonce = server_first
        .strip_prefix("r=")
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_owned();
    let mut fin = String::from_utf8_lossy(&fin).replace("%N", &nonce);
    if let Some((without_proof, _)) = fin.split_once(",p=%P") {
        let bare = String::from_utf8_lossy(&first);
        let bare = bare.splitn(3, ',').nth(2).unwrap_or_default();
        let auth = format!("{bare},{server_first},{without_proof}");
        fin = format!("{without_proof},p={}", proof(&auth));
    }
    if c.write_all(&frame(b'p', fin.as_bytes())).await.is_err() {
        return false;
    }
    matches!(read_msg(&mut c).await, Some((b'R', body)) if body.starts_with(&12i32.to_be_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let method = if ctl & 1 == 0 {
        AuthMethod::ScramSha256
    } else {
        AuthMethod::Md5
    };
    let user = match (ctl >> 1) & 3 {
        0 | 1 => "alice",
        2 => "bob",
        _ => "nobody",
    };
    let scripted = ctl & 8 == 0;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut server, mut client) = tokio::io::duplex(1 << 17);
        let server_side = async {
            let r = authenticate_client(&mut server, method, user, store()).await;
            drop(server);
            r
        };
        let exchange = async { if scripted {
            let sep = rest.windows(3).position(|w| w == b"|~|");
            let (first, fin) = match sep {
                Some(i) => (rest[..i].to_vec(), rest[i + 3..].to_vec()),
                None => (rest.to_vec(), Vec::new()),
            };
            tokio::join!(server_side, scripted_client(client, first, fin))
        } else {
            let feed = async {
                let _ = client.write_all(rest).await;
                let _ = client.shutdown().await;
                // Drain whatever the server writes until it hangs up.
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
                false
            };
            tokio::join!(server_side, feed)
        }};
        let (result, client_passed) = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("authentication exchange finished");
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!("{method:?} {user} scripted={scripted}: server {result:?}, client saw final: {client_passed}");
        }
        if client_passed {
            assert!(result.is_ok(), "server sent SASLFinal but failed the login");
        }
        if result.is_ok() {
            assert_ne!(user, "nobody", "unknown user authenticated");
        }
    });
});
