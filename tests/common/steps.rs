//! Scripted steps run on a direct connection and through the proxy, compared message for
//! message (tests of statement handling in transaction mode).

use std::net::SocketAddr;

use super::raw::{essential, Got, RawClient};
use super::{cluster, TestProxy};

/// One step: which client, what it sends, how many ReadyForQuery end its answer.
pub struct Step {
    pub client: usize,
    pub what: &'static str,
    pub readies: usize,
    pub send: fn(&mut RawClient),
}

pub fn step(client: usize, what: &'static str, readies: usize, send: fn(&mut RawClient)) -> Step {
    Step {
        client,
        what,
        readies,
        send,
    }
}

/// Error texts differ where the proxy names its own statements (`pgsl_...`); with
/// `codes_only` errors are compared by SQLSTATE alone.
async fn run(addr: SocketAddr, clients: usize, steps: &[Step], codes_only: bool) -> Vec<Vec<Got>> {
    let mut cs = Vec::new();
    for _ in 0..clients {
        cs.push(RawClient::connect(addr).await);
    }
    let mut out = Vec::new();
    for s in steps {
        let c = &mut cs[s.client];
        (s.send)(c);
        let mut got = c.roundtrip().await;
        for _ in 1..s.readies {
            got.extend(c.until(|g| matches!(g, Got::Ready(_))).await);
        }
        let got = essential(&got)
            .into_iter()
            .map(|g| match g {
                Got::Error(code, _) if codes_only => Got::Error(code, String::new()),
                g => g,
            })
            .collect();
        out.push(got);
    }
    out
}

/// Runs `steps` directly, then through a proxy started with `proxy_flags`, and asserts
/// every step's answer is the same.
pub async fn differential(proxy_flags: &[&str], clients: usize, steps: &[Step], codes_only: bool) {
    let pg = cluster().await;
    let direct = run(pg.addr(), clients, steps, codes_only).await;
    let proxy = TestProxy::start(&pg, proxy_flags).await;
    let pooled = run(proxy.addr(), clients, steps, codes_only).await;
    for ((s, d), p) in steps.iter().zip(&direct).zip(&pooled) {
        assert_eq!(
            p, d,
            "step {:?} of client {}: through pgsluice (left) and direct (right) differ",
            s.what, s.client
        );
    }
    proxy.shutdown().await;
}
