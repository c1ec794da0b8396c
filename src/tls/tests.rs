//! The relay over TLS with a client socket that is always full: everything rustls accepted
//! must reach the client even after the relay has gone idle.

use super::{provider, ClientStream, ServerStream};
use crate::pool::ServerConn;
use crate::session::relay::{relay, RelayEvent, RelayState};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn certs() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (cert.der().clone(), key)
}

type Acceptor = tokio_rustls::server::TlsStream<TcpStream>;
type Connector = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection over loopback whose proxy end (the accepting end when `proxy_accepts`)
/// has a tiny send buffer and whose other end a tiny receive buffer, so rustls output meets
/// a full socket on nearly every write.
async fn tls_pair(proxy_accepts: bool) -> (Acceptor, Connector) {
    let (cert, key) = certs();
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    if proxy_accepts {
        sock.set_recv_buffer_size(4096).unwrap();
    } else {
        sock.set_send_buffer_size(4096).unwrap();
    }
    let connect = sock.connect(l.local_addr().unwrap());
    let (tcp, accepted) = tokio::join!(connect, l.accept());
    let (accepted, _) = accepted.unwrap();
    let accepted_ref = socket2::SockRef::from(&accepted);
    if proxy_accepts {
        accepted_ref.set_send_buffer_size(4096).unwrap();
    } else {
        accepted_ref.set_recv_buffer_size(4096).unwrap();
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let (s, c) = tokio::join!(
        acceptor.accept(accepted),
        connector.connect(name, tcp.unwrap())
    );
    (s.unwrap(), c.unwrap())
}

/// Reads the client's first bytes into the relay state, as an idle session does:
/// readiness, then a read that does not wait.
async fn read_first(client: &mut ClientStream, st: &mut RelayState) {
    loop {
        client.readable().await.unwrap();
        let _ = st.c2s.spare();
        let from = st.c2s.end;
        match client.try_read(st.c2s.spare()) {
            Ok(n) => {
                assert!(n > 0, "client closed");
                st.c2s.end += n;
                st.scan_client(from).unwrap();
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_held_by_rustls_is_flushed_before_the_relay_goes_idle() {
    let (accepted, mut client) = tls_pair(true).await;
    let mut proxy_side = ClientStream::Tls(Box::new(accepted));
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let (to_server, accepted) = tokio::join!(TcpStream::connect(addr), upstream.accept());
    let mut fake_pg = accepted.unwrap().0;
    let mut server = ServerConn::new(1, ServerStream::Plain(to_server.unwrap()), addr, 1, 1);

    // The fake server answers one Query with 2 MB of rows, CommandComplete and ReadyForQuery.
    let pg = tokio::spawn(async move {
        let mut q = [0u8; 5];
        fake_pg.read_exact(&mut q).await.unwrap();
        let len = i32::from_be_bytes([q[1], q[2], q[3], q[4]]) as usize;
        let mut rest = vec![0u8; len - 4];
        fake_pg.read_exact(&mut rest).await.unwrap();
        let row = msg(b'D', &[b'x'; 2000]);
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend_from_slice(&row);
        }
        out.extend(msg(b'C', b"SELECT 1000\0"));
        out.extend(msg(b'Z', b"I"));
        fake_pg.write_all(&out).await.unwrap();
        fake_pg
    });
    let reader = tokio::spawn(async move {
        client.write_all(&msg(b'Q', b"SELECT\0")).await.unwrap();
        client.flush().await.unwrap();
        // Read slowly, so the proxy's socket stays full.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(&msg(b'Z', b"I")) {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "proxy closed");
            got.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        got.len()
    });
    let mut st = RelayState::new();
    read_first(&mut proxy_side, &mut st).await;
    assert!(st.has_client_work());
    let ev = tokio::time::timeout(
        Duration::from_secs(30),
        relay(&mut proxy_side, &mut server, &mut st),
    )
    .await
    .expect("relay never went idle");
    assert!(matches!(ev, RelayEvent::Idle), "{ev:?}");
    // Idle like a session waiting for its client's next query: nothing polls the stream.
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the client never received the end of the result")
        .unwrap();
    assert_eq!(got, 1000 * 2005 + 17 + 6);
    drop(pg.await.unwrap());
    drop(proxy_side);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_held_by_rustls_reaches_a_tls_upstream() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (app, accepted) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    let mut app = app.unwrap();
    let mut proxy_side = ClientStream::Plain(accepted.unwrap().0);
    let (mut fake_pg, to_pg) = tls_pair(false).await;
    let addr = l.local_addr().unwrap();
    let mut server = ServerConn::new(1, ServerStream::Tls(Box::new(to_pg)), addr, 1, 1);
    // Small buffers make this slow (delayed ACKs), so a few times rustls' 64 KiB is enough.
    let sql = vec![b'x'; 300_000];
    let mut query = sql.clone();
    query.push(0);
    let query = msg(b'Q', &query);
    let expect = query.len();
    // The fake server reads the whole Query slowly, then answers it.
    let pg = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got < expect {
            let n = fake_pg.read(&mut buf).await.unwrap();
            assert!(n > 0, "proxy closed");
            got += n;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let mut out = msg(b'C', b"SELECT 0\0");
        out.extend(msg(b'Z', b"I"));
        fake_pg.write_all(&out).await.unwrap();
        fake_pg.flush().await.unwrap();
        fake_pg
    });
    let writer = tokio::spawn(async move {
        app.write_all(&query).await.unwrap();
        let mut answer = vec![0u8; 14 + 6];
        app.read_exact(&mut answer).await.unwrap();
        answer
    });
    let mut st = RelayState::new();
    read_first(&mut proxy_side, &mut st).await;
    let ev = tokio::time::timeout(
        Duration::from_secs(30),
        relay(&mut proxy_side, &mut server, &mut st),
    )
    .await
    .expect("the upstream never received the whole query");
    assert!(matches!(ev, RelayEvent::Idle), "{ev:?}");
    let answer = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("no answer")
        .unwrap();
    assert!(answer.ends_with(&msg(b'Z', b"I")));
    drop(pg.await.unwrap());
}

#[test]
fn a_plain_client_stream_is_no_larger_than_before() {
    // The session keeps one per client, idle ones included.
    println!(
        "ClientStream {} bytes, TcpStream {} bytes",
        std::mem::size_of::<ClientStream>(),
        std::mem::size_of::<TcpStream>()
    );
    assert_eq!(
        std::mem::size_of::<ClientStream>(),
        std::mem::size_of::<TcpStream>()
    );
}

/// The session task's future is allocated for every client, idle ones included.
#[tokio::test]
async fn session_future_size() {
    let cfg = crate::config::Config::from_args([
        "pgsluice",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--upstream",
        "postgres://127.0.0.1:1/x",
    ])
    .unwrap();
    let handle = crate::server::start(cfg).await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_c, s) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    let fut = crate::session::run(s.unwrap().0, handle.shared().clone());
    let size = std::mem::size_of_val(&fut);
    println!("session future: {size} bytes");
    // 4,120 bytes before TLS support (the handshake state is boxed so it adds nothing);
    // 4,416 with session-parameter tracking (its value sets are sparse vectors and its
    // rare async steps are boxed); 4,440 with the resend of a batch whose server was dead
    // (its state boxed behind one pointer); 4,448 when the slot and the connection lease are
    // freed under one guard lock at the end of a transaction; 4,576 with the console's
    // per-batch statistics (bytes, Parse/Bind counts, transaction start) and the server
    // connection's place in `SHOW SERVERS`; 4,528 once authentication (with the auth
    // query) is boxed; 4,552 with the server connection's upstream host (boxed, for
    // multi-host routing). Growth past that should be a decision, not an accident.
    assert!(size <= 4552, "session future grew to {size} bytes");
}
