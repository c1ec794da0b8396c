//! Named prepared statements in transaction mode when one message of a pipelined batch
//! fails: the server skips the rest of the batch up to Sync, including the Parses the proxy
//! injected for the client's other statements, so those must be prepared again later.
//! (Pipelining drivers such as pgjdbc's batches send several statements before one Sync.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{cluster, TestProxy};

fn msg(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut m = vec![tag];
    m.extend_from_slice(&(len as i32).to_be_bytes());
    for p in parts {
        m.extend_from_slice(p);
    }
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', &[&cstr(name), &cstr(sql), &0i16.to_be_bytes()])
}

/// Bind of the unnamed portal with one text parameter, then Execute.
fn bind_execute(stmt: &str, param: &str) -> Vec<u8> {
    let mut m = msg(
        b'B',
        &[
            &cstr(""),
            &cstr(stmt),
            &0i16.to_be_bytes(),
            &1i16.to_be_bytes(),
            &(param.len() as i32).to_be_bytes(),
            param.as_bytes(),
            &0i16.to_be_bytes(),
        ],
    );
    m.extend(msg(b'E', &[&cstr(""), &0i32.to_be_bytes()]));
    m
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

struct Frontend {
    s: TcpStream,
}

/// What a batch produced: the text of each DataRow's first column and each SQLSTATE.
#[derive(Debug, Default)]
struct Answer {
    rows: Vec<String>,
    errors: Vec<String>,
}

impl Frontend {
    async fn connect(addr: SocketAddr) -> Frontend {
        let s = TcpStream::connect(addr).await.expect("connect to proxy");
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", "postgres"), ("database", "postgres")] {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        let mut f = Frontend { s };
        f.s.write_all(&pkt).await.expect("send startup");
        let a = f.until_ready().await;
        assert!(a.errors.is_empty(), "startup failed: {a:?}");
        f
    }

    async fn send(&mut self, bytes: &[u8]) -> Answer {
        self.s.write_all(bytes).await.expect("send batch");
        self.until_ready().await
    }

    async fn until_ready(&mut self) -> Answer {
        let read = async {
            let mut a = Answer::default();
            for _ in 0..1000 {
                let tag = self.s.read_u8().await?;
                let len = self.s.read_i32().await?;
                assert!((4..1 << 20).contains(&len), "bad length {len}");
                let mut body = vec![0u8; len as usize - 4];
                self.s.read_exact(&mut body).await?;
                match tag {
                    b'D' => {
                        let n = i32::from_be_bytes(body[2..6].try_into().unwrap());
                        let v = &body[6..6 + n.max(0) as usize];
                        a.rows.push(String::from_utf8_lossy(v).into_owned());
                    }
                    b'E' => a.errors.push(sqlstate(&body)),
                    b'Z' => return Ok::<_, std::io::Error>(a),
                    _ => {}
                }
            }
            panic!("no ReadyForQuery after 1000 messages");
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("no ReadyForQuery within 10 s")
            .expect("read from proxy")
    }
}

fn sqlstate(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        if field == b'C' {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = &tail[end + 1..];
    }
    "no SQLSTATE".into()
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_skipped_after_an_error_are_prepared_again() {
    let pg = cluster().await;
    let proxy = TestProxy::start(&pg, &["--pool-mode", "transaction", "--pool-size", "2"]).await;
    let h1 = proxy.client().await;
    let h2 = proxy.client().await;
    let mut app = Frontend::connect(proxy.addr()).await;

    // With one server held in a transaction, the client prepares on the other, X.
    h1.batch_execute("BEGIN").await.unwrap();
    let held = backend_pid(&h1).await;
    let mut batch = parse("fail", "SELECT 1 / $1::int");
    batch.extend(parse("double", "SELECT $1::int * 2"));
    batch.extend(parse("triple", "SELECT $1::int * 3"));
    batch.extend(sync());
    let a = app.send(&batch).await;
    assert!(a.errors.is_empty(), "{a:?}");
    let a = app
        .send(&msg(b'Q', &[&cstr("SELECT pg_backend_pid()")]))
        .await;
    let x: i32 = a.rows[0].parse().expect("pid");
    assert_ne!(x, held);
    h1.batch_execute("COMMIT").await.unwrap();

    // Hold X, so the client's next batches run on the other server, which has none of
    // its statements: the proxy must prepare them there first.
    h2.batch_execute("BEGIN").await.unwrap();
    if backend_pid(&h2).await != x {
        h1.batch_execute("BEGIN").await.unwrap();
        assert_eq!(backend_pid(&h1).await, x, "two servers, one held by h2");
        h2.batch_execute("COMMIT").await.unwrap();
    }

    // One batch: the first statement fails at execution; the server skips the rest,
    // including the Parses of the other two.
    let mut batch = bind_execute("fail", "0");
    batch.extend(bind_execute("double", "5"));
    batch.extend(bind_execute("triple", "7"));
    batch.extend(sync());
    let a = app.send(&batch).await;
    assert_eq!(a.errors, ["22012"], "{a:?}");
    assert!(a.rows.is_empty(), "{a:?}");

    // Same server, each statement on its own: all must work as they would directly.
    let a = app
        .send(&[bind_execute("triple", "7"), sync()].concat())
        .await;
    assert_eq!(
        (a.rows.as_slice(), a.errors.as_slice()),
        (&["21".to_string()][..], &[][..])
    );
    let a = app
        .send(&[bind_execute("double", "5"), sync()].concat())
        .await;
    assert_eq!(
        (a.rows.as_slice(), a.errors.as_slice()),
        (&["10".to_string()][..], &[][..])
    );
    let a = app
        .send(&[bind_execute("fail", "4"), sync()].concat())
        .await;
    assert_eq!(a.rows, ["0"], "{a:?}");
    let a = app
        .send(&msg(b'Q', &[&cstr("SELECT pg_backend_pid()")]))
        .await;
    assert_ne!(
        a.rows[0],
        x.to_string(),
        "the batches ran on the server not held"
    );
}
